"""How many points an event has, and its total visible energy: per-event models beside the diffusion.

The diffusion generates the points of an event, not their number, and a small per-point bias of
a denoised log-energy becomes a large bias of the shower's sum. :class:`PerEventModels` fits, per
geometry tag and bin of log10 incident energy, the quantiles of ``log n`` and of
``log(E_visible / E_incident)``, tied together by a Gaussian copula (the correlation of their
normal scores within energy bins), and draws from them, interpolating quantile curves between
neighbouring energy bins. It is a mixin of :class:`~pcfm.tasks.diffusion.PointDiffusion`, whose
buffers (``n_points_quantiles``, ``visible_energy_quantiles``, ...) hold the fits, so that they are
saved with the model.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from pcfm.nn.encoding import geometry_indices

#: Quantile levels of the per-event models are read within [this, 1 - this] when they come from
#: a normal score (a level of exactly 0 or 1 would be the sample's extreme, or infinite).
LEVEL_CLIP = 0.005


class PerEventModels:
    """Fits and draws of the points-per-event and visible-energy models (module docstring).

    The host module provides the buffers ``n_points_levels``, ``n_points_quantiles``,
    ``n_points_events``, ``visible_energy_quantiles``, ``visible_energy_events``,
    ``points_energy_correlation`` and the attributes ``geometry_vocabulary``,
    ``n_points_log10_range``, ``n_points_bins_per_decade``.
    """

    def _energy_bin(self, log10_energy: np.ndarray) -> np.ndarray:
        low = self.n_points_log10_range[0]
        n_bins = self.n_points_events.shape[1]
        return np.clip(np.floor((log10_energy - low) * self.n_points_bins_per_decade), 0, n_bins - 1).astype(np.int64)

    def fit_n_points(self, n_points: Sequence[int], incident_energy: Sequence[float],
                     geometry: Sequence[str], visible_energy: Optional[Sequence[float]] = None) -> None:
        """Quantiles of log(n points) per (geometry tag, log10 energy bin) of the given events, and
        with ``visible_energy`` (MeV, the sum over each event's points) those of
        log(visible / incident energy) and the copula correlation of the two.

        Events without a positive incident energy are left out (and from the energy model, events
        without a positive visible energy); energies beyond the grid fall in its edge bins. A bin
        without events takes the curve of its nearest filled bin. Only the geometry tags present
        are refitted.
        """
        n_points = np.asarray(n_points, dtype=np.float64)
        energy = np.asarray(incident_energy, dtype=np.float64)
        tags = geometry_indices(list(geometry), self.geometry_vocabulary, len(geometry), torch.device("cpu")).numpy()
        usable = np.isfinite(energy) & (energy > 0) & (n_points > 0)
        energy_bin = self._energy_bin(np.log10(np.where(usable, energy, 1.0)))
        log_n = np.log(np.where(usable, n_points, 1.0))
        ratio = None
        if visible_energy is not None:
            visible = np.asarray(visible_energy, dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.log(visible / energy)
        for tag in np.unique(tags[usable]):
            of_tag = usable & (tags == tag)
            self.n_points_quantiles[tag], self.n_points_events[tag] = self._quantile_table(log_n, energy_bin, of_tag)
            if ratio is None:
                continue
            of_tag = of_tag & np.isfinite(ratio)
            if not of_tag.any():
                continue
            table, counts = self._quantile_table(ratio, energy_bin, of_tag)
            self.visible_energy_quantiles[tag], self.visible_energy_events[tag] = table, counts
            self.points_energy_correlation[tag] = _copula_correlation(log_n[of_tag], ratio[of_tag],
                                                                      energy_bin[of_tag])

    def _quantile_table(self, values: np.ndarray, energy_bin: np.ndarray, selected: np.ndarray):
        """(n_bins, n_levels) quantiles of ``values[selected]`` per energy bin, and events per bin."""
        levels = self.n_points_levels.cpu().numpy()
        n_bins = self.n_points_events.shape[1]
        quantiles, counts = np.zeros((n_bins, levels.size)), np.zeros(n_bins, dtype=np.int64)
        for b in np.unique(energy_bin[selected]):
            in_bin = values[selected & (energy_bin == b)]
            quantiles[b], counts[b] = np.quantile(in_bin, levels), in_bin.size
        filled = np.flatnonzero(counts)
        nearest = filled[np.abs(np.arange(n_bins)[:, None] - filled[None, :]).argmin(1)]
        return torch.from_numpy(quantiles[nearest]).float(), torch.from_numpy(counts)

    def _curves(self, table: Tensor, events: Tensor, energy: np.ndarray, names: list[str], what: str, hint: str):
        """Quantile curves (B, n_levels) at these energies: the two bins around each, mixed
        linearly in log10 energy (flat beyond the grid); an error names an unfitted geometry."""
        tags = geometry_indices(names, self.geometry_vocabulary, energy.size, torch.device("cpu"))
        seen = events.cpu().sum(1) > 0
        unseen = sorted({name for name, tag in zip(names, tags.tolist()) if not seen[tag]})
        if unseen:
            raise ValueError(f"the {what} model saw no training events of geometry {unseen[0]!r} "
                             f"(fit it with on_data, or {hint})")
        quantiles = table.cpu()
        n_bins = quantiles.shape[1]
        position = (np.log10(energy) - self.n_points_log10_range[0]) * self.n_points_bins_per_decade - 0.5
        position = torch.from_numpy(np.clip(position, 0, n_bins - 1)).float()
        lower = position.floor().long().clamp(max=max(n_bins - 2, 0))
        upper = (lower + 1).clamp(max=n_bins - 1)
        weight = (position - lower)[:, None]
        return (1 - weight) * quantiles[tags, lower] + weight * quantiles[tags, upper], tags

    @staticmethod
    def _at_level(curves: Tensor, level: Tensor) -> Tensor:
        """Each curve (B, L) read at its level in [0, 1] (B,), linearly between quantile levels."""
        position = level.clamp(0, 1) * (curves.shape[1] - 1)
        below = position.floor().long().clamp(max=curves.shape[1] - 2)
        fraction = position - below
        rows = torch.arange(curves.shape[0])
        return (1 - fraction) * curves[rows, below] + fraction * curves[rows, below + 1]

    @staticmethod
    def _level_of(curves: Tensor, values: Tensor) -> Tensor:
        """The inverse of :meth:`_at_level`: the level (B,) at which each curve reaches its value."""
        n_levels = curves.shape[1]
        upper = torch.searchsorted(curves.contiguous(), values[:, None].contiguous()).squeeze(1).clamp(1, n_levels - 1)
        rows = torch.arange(curves.shape[0])
        low, high = curves[rows, upper - 1], curves[rows, upper]
        fraction = ((values - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)
        return (upper - 1 + fraction) / (n_levels - 1)

    @staticmethod
    def _check_energies(energy) -> np.ndarray:
        energy = np.asarray(energy, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(energy) & (energy > 0)):
            raise ValueError("incident energies must be positive and finite (MeV) to sample from the per-event models")
        return energy

    def has_visible_energy_model(self, geometry: str) -> bool:
        """Whether :meth:`sample_visible_energy` can draw for ``geometry`` (fitted on its events)."""
        tag = int(geometry_indices([geometry], self.geometry_vocabulary, 1, torch.device("cpu"))[0])
        return bool(self.visible_energy_events[tag].sum() > 0)

    def sample_visible_energy(self, incident_energy, geometry: Union[str, Sequence[str]] = "",
                              n_points=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Total visible energies (B,) MeV drawn from the fitted model at these incident energies.

        With ``n_points`` (B,), each draw is conditional on that event's number of points through
        the fitted Gaussian copula (its normal score read off the points model); without, the
        draws ignore it. ``generator`` (CPU) draws the levels.
        """
        energy = self._check_energies(incident_energy)
        names = [geometry] * energy.size if isinstance(geometry, str) else list(geometry)
        curves, tags = self._curves(self.visible_energy_quantiles, self.visible_energy_events, energy, names,
                                    "visible-energy", "generate with calibrate_energy=False")
        normal = torch.distributions.Normal(0.0, 1.0)
        score = normal.icdf(torch.rand(energy.size, generator=generator).clamp(LEVEL_CLIP, 1 - LEVEL_CLIP))
        if n_points is not None:
            n_curves, _ = self._curves(self.n_points_quantiles, self.n_points_events, energy, names, "points-per-event",
                                       "sample without n_points")
            log_n = torch.as_tensor(np.asarray(n_points, dtype=np.float64).reshape(-1), dtype=torch.float32).log()
            n_score = normal.icdf(self._level_of(n_curves, log_n).clamp(LEVEL_CLIP, 1 - LEVEL_CLIP))
            correlation = self.points_energy_correlation.cpu()[tags]
            score = correlation * n_score + (1 - correlation.square()).clamp(min=0).sqrt() * score
        log_ratio = self._at_level(curves, normal.cdf(score))
        return torch.from_numpy(energy).float() * log_ratio.exp()

    def sample_n_points(self, incident_energy, geometry: Union[str, Sequence[str]] = "",
                        generator: Optional[torch.Generator] = None) -> Tensor:
        """Points per event (B,) long >= 1 drawn from the fitted model at these energies (MeV).

        The quantile curves of the two energy bins around each energy are mixed linearly in
        log10 energy (flat beyond the grid), and ``log n`` is read off at a uniform level drawn
        from ``generator`` (CPU).
        """
        energy = self._check_energies(incident_energy)
        names = [geometry] * energy.size if isinstance(geometry, str) else list(geometry)
        curves, _ = self._curves(self.n_points_quantiles, self.n_points_events, energy, names, "points-per-event",
                                 "give n_points")
        log_n = self._at_level(curves, torch.rand(energy.size, generator=generator))
        return log_n.exp().round().long().clamp(min=1)


def _normal_scores(values: np.ndarray) -> np.ndarray:
    """Phi^-1 of the mid-ranks of ``values`` (ties share their mean rank)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size)
    _, inverse = np.unique(values, return_inverse=True)
    ranks = (np.bincount(inverse, ranks) / np.bincount(inverse))[inverse]
    levels = torch.from_numpy((ranks + 0.5) / values.size)
    return torch.distributions.Normal(0.0, 1.0).icdf(levels).numpy()


def _copula_correlation(first: np.ndarray, second: np.ndarray, groups: np.ndarray) -> float:
    """Correlation of the normal scores of two quantities, scored within each group (energy bin,
    so the shared energy dependence does not count) and pooled; 0 with fewer than 3 events a bin."""
    pairs = [(_normal_scores(first[groups == g]), _normal_scores(second[groups == g]))
             for g in np.unique(groups) if np.sum(groups == g) >= 3]
    if not pairs:
        return 0.0
    a, b = (np.concatenate(part) for part in zip(*pairs))
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.clip(np.corrcoef(a, b)[0, 1], -0.999, 0.999))
