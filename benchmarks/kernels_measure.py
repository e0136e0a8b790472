"""The measuring harness of benchmarks/kernels.py: the run's options, what a row is (:class:`Method`,
:class:`Case`), and how one prepared row is checked, timed and weighed.

Separate from kernels.py so that the row builders (kernels_cases.py) and the script share these
without importing each other; nothing here knows the rows themselves.
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

#: Longest a single timing loop may run once its first 3 calls are done (seconds).
TIMING_CAP_S = 20.0


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    scale: float = 1.0
    repeats: int = 10
    warmup: int = 2
    budget_s: float = 420.0
    only: Optional[str] = None
    seed: int = 0
    compile_backend: str = "inductor"
    #: For the CPU smoke test only: run the GPU rows on CPU (kernels in Triton's interpreter,
    #: torch.compile with ``compile_backend``).
    gpu_rows_on_cpu: bool = False


@dataclass
class Method:
    """A benchmark row: what runs and where it can run."""

    label: str
    runs_on: str           # "any", "cuda" (no CPU path), "gpu" (CUDA, or CPU in the smoke test), "cpu"
    fwd_only: bool = False
    estimate_s: float = 15.0        # budget needed to start the row the first time ...
    warm_estimate_s: float = 10.0   # ... and once the same method has run (compiled already)
    fwd_estimate_s: float = 0.0     # extra budget the no-grad forward needs (a second compile)


@dataclass
class Case:
    """A prepared row: ``forward()`` runs the op; gradients are taken for ``inputs``.

    ``to_rows`` maps the op's output (and the gradients of its first inputs) to one row per
    token or node, for the comparison with the reference; ``checked_inputs`` says how many
    of ``inputs`` have such a gradient (the others are the slope or the weights).
    """

    forward: Callable[[], Tensor]
    inputs: list[Tensor]
    grad_output: Optional[Tensor]
    to_rows: Callable[[Tensor], Tensor] = lambda tensor: tensor
    checked_inputs: int = 3
    notes: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], options: Options) -> tuple[float, int]:
    """Median wall time of ``fn`` in ms after the warm-up calls, and how many calls it timed."""
    for _ in range(options.warmup):
        fn()
    synchronize(options.device)
    times = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        fn()
        synchronize(options.device)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and sum(times) > TIMING_CAP_S:
            break
    return 1000.0 * statistics.median(times), len(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory ``fn`` allocates at its peak beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**30


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|."""
    scale = want.double().abs().max().item()
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def measure(case: Case, method: Method, reference: Callable[[], tuple[Tensor, list[Tensor]]],
            rows_checked: int, run) -> dict:
    """Check, then time and weigh one prepared row; every failure is recorded, never raised.

    ``run`` is kernels.py's ``Run``: its ``options`` and the budget it has ``left()``.
    """
    options, result, problems = run.options, {}, []
    start = time.perf_counter()
    backward = not method.fwd_only and case.grad_output is not None
    out = grads = None
    if backward:  # the first call compiles
        try:
            out = case.forward()
            case.grad_output = case.grad_output.to(out.dtype)
            grads = torch.autograd.grad(out, case.inputs, case.grad_output)
        except Exception as error:
            problems.append(f"fwd+bwd: {describe(error)}")
            backward = False
    if not backward:
        try:
            with torch.no_grad():
                out = case.forward()
        except Exception as error:
            return {"status": "; ".join(problems + [f"error: {describe(error)}"])}
    synchronize(options.device)
    result["first_call_s"] = round(time.perf_counter() - start, 2)
    try:
        want_out, want_grads = reference()
        result["rel_err_out"] = relative_error(case.to_rows(out)[:rows_checked], want_out)
        if grads is not None:
            result["rel_err_grad"] = max(relative_error(case.to_rows(grad)[:rows_checked], want)
                                         for grad, want in zip(grads[:case.checked_inputs], want_grads))
    except Exception as error:
        problems.append(f"check: {describe(error)}")
    del out, grads

    def fwd():
        with torch.no_grad():
            return case.forward()

    def fwd_bwd():
        return torch.autograd.grad(case.forward(), case.inputs, case.grad_output)

    for key, fn, wanted in (("fwdbwd", fwd_bwd, backward), ("fwd", fwd, True)):
        if not wanted:
            continue
        if key == "fwd" and run.left() < method.fwd_estimate_s:
            problems.append(f"fwd skipped: budget ({run.left():.0f} s left)")
            continue
        try:
            result[f"{key}_ms"], result["repeats"] = median_ms(fn, options)
            result[f"{key}_peak_gib"] = peak_gib(fn, options.device)
        except Exception as error:
            problems.append(f"{key}: {describe(error)}")
    result["status"] = "ok" if not problems else "; ".join(problems)
    return result
