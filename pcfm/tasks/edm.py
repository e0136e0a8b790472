"""EDM (Karras et al. 2022): preconditioning, loss weight, noise schedule and samplers.

Plain functions of a denoiser ``D(x, sigma)``: nothing here knows about point clouds, so the
formulas can be checked against the paper on their own (tests/tasks/test_diffusion.py).
:class:`~pcfm.tasks.diffusion.PointDiffusion` trains and samples with them.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

#: Samplers of :meth:`~pcfm.tasks.diffusion.PointDiffusion.sample`.
SAMPLERS = ("heun", "stochastic", "dpmpp2m")

def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM at noise levels ``sigma`` (any shape)."""
    sigma = torch.as_tensor(sigma)
    total = sigma.square() + sigma_data ** 2
    return (sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), 1.0 / total.sqrt(), sigma.log() / 4)


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (1 / c_out^2)."""
    sigma = torch.as_tensor(sigma)
    return (sigma.square() + sigma_data ** 2) / (sigma * sigma_data).square()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """The ``steps + 1`` noise levels of EDM's schedule, from ``sigma_max`` to ``sigma_min``, then 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    high, low = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [float(s) for s in (high + ramp * (low - high)) ** rho] + [0.0]


Denoiser = Callable[[Tensor, float], Tensor]


def network_calls(sampler: str, steps: int) -> int:
    """Denoiser evaluations of ``sampler`` with ``steps`` steps (the cost of one generation)."""
    calls = {"heun": 2 * steps - 1, "stochastic": 2 * steps, "dpmpp2m": steps}
    if sampler not in calls:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    return calls[sampler]


def _heun_step(denoise: Denoiser, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One step of EDM's 2nd-order Heun solver of the probability-flow ODE (Euler into sigma = 0)."""
    slope = (x - denoise(x, sigma)) / sigma
    x_next = x + (sigma_next - sigma) * slope
    if sigma_next > 0:
        slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * 0.5 * (slope + slope_next)
    return x_next


def heun_sampler(denoise: Denoiser, noise: Tensor, sigmas: Sequence[float]) -> Tensor:
    """EDM Algorithm 1: deterministic sampling from standard-normal ``noise`` along ``sigmas``.

    ``denoise(x, sigma)`` returns the denoised estimate of the whole ragged batch ``x`` at the
    scalar noise level ``sigma``; it is called ``2 (len(sigmas) - 1) - 1`` times.
    """
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = _heun_step(denoise, x, sigma, sigma_next)
    return x


def dpmpp2m_sampler(denoise: Denoiser, noise: Tensor, sigmas: Sequence[float]) -> Tensor:
    """DPM-Solver++(2M): deterministic sampling from ``noise`` along ``sigmas``, one network call a step.

    With ``lambda = -ln sigma`` and ``h = lambda_next - lambda`` (the ODE of EDM has alpha = 1), a
    step is ``x <- (sigma_next / sigma) x + (1 - sigma_next / sigma) D``, where ``D`` is the
    denoised estimate extrapolated linearly in lambda from this step's and the previous step's:
    ``D = (1 + 1 / 2r) D_i - (1 / 2r) D_(i-1)``, ``r = h_(i-1) / h_i``. The first step, and the
    last one into sigma = 0 (which returns ``D_i`` itself), are first order. Versus Heun (two calls
    a step) it reaches the same truncation order at half the network calls; it is meant for
    sampling in few steps.
    """
    x = noise * sigmas[0]
    previous: Optional[tuple[Tensor, float]] = None  # (denoised, h) of the step before
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            return denoised
        h = math.log(sigma / sigma_next)
        extrapolated = denoised
        if previous is not None:
            half_inverse_r = 0.5 * h / previous[1]
            extrapolated = (1 + half_inverse_r) * denoised - half_inverse_r * previous[0]
        x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * extrapolated
        previous = (denoised, h)
    return x


def stochastic_sampler(denoise: Denoiser, noise: Tensor, sigmas: Sequence[float], *,
                       generator: Optional[torch.Generator] = None, churn: float = 10.0, sigma_tmin: float = 0.05,
                       sigma_tmax: float = 50.0, sigma_noise: float = 1.0) -> Tensor:
    """EDM Algorithm 2: Heun steps with fresh noise raising sigma by ``gamma`` before each one.

    ``gamma = min(churn / steps, sqrt(2) - 1)`` for sigmas in ``[sigma_tmin, sigma_tmax]``, else 0; the
    added noise has standard deviation ``sigma_noise sqrt(sigma_hat^2 - sigma^2)``, drawn from ``generator``.
    """
    steps = len(sigmas) - 1
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(churn / steps, math.sqrt(2) - 1) if sigma_tmin <= sigma <= sigma_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2) * fresh
        x = _heun_step(denoise, x, sigma_hat, sigma_next)
    return x
