"""Encodings of what the backbone sees: positions, point features and event conditioning.

Positions are in each event's detector frame in material units (:mod:`pcfm.nn.frame`: X0 and
Moliere radii in a calorimeter, X0 of argon in a LArTPC), so one model reads SiW cells of 0.4 R_M
and LArTPC voxels of 0.02 X0 alike. :class:`FourierFeatures` turns a coordinate ``x`` into
``sin(2 pi x / L_k)`` and ``cos(2 pi x / L_k)`` for wavelengths ``L_k`` log-spaced between
:data:`MIN_WAVELENGTH` (0.02 units: a LArTPC voxel) and :data:`MAX_WAVELENGTH` (200 units:
beyond the largest detector), so that every scale in between is resolved by some frequency and
none aliases. The sines run in float32 even under bf16 autocast (elementwise ops are not
autocast): a fine wavelength far from the origin needs the precision.

Event conditioning (:class:`ConditionEncoder`) is optional field by field: a missing or NaN
value becomes zeros plus a "known" flag of 0, so that data without incident energy or angles
(LArTPC, unknown-angle showers) uses the same model.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

#: Shortest and longest wavelength of the Fourier position features, in frame units (X0, R_M).
MIN_WAVELENGTH = 0.02
MAX_WAVELENGTH = 200.0
#: Incident energies enter as log10(E / ENERGY_SCALE_MEV): 1 GeV -> 0, 1 MeV .. 1 TeV -> -3 .. 3.
ENERGY_SCALE_MEV = 1_000.0
#: Columns of :func:`condition_features`: each group of values is followed by its "known" flag.
CONDITION_FEATURES = ("log10_energy_gev", "energy_known", "cos_theta", "sin_theta", "theta_known",
                      "cos_phi", "sin_phi", "phi_known")
#: Index of the geometry tag given to a name outside the vocabulary (or no name).
UNKNOWN_GEOMETRY = 0


class FourierFeatures(nn.Module):
    """Fixed multi-scale sine-cosine features of coordinates (frame units).

    ``(..., in_dim)`` -> ``(..., in_dim * 2 * num_frequencies)`` float32, with wavelengths
    log-spaced from ``min_wavelength`` to ``max_wavelength`` (in the coordinates' units). No learned parameters; the
    wavelengths are a non-persistent buffer (they follow from the config).
    """

    def __init__(self, num_frequencies: int, *, in_dim: int = 3, min_wavelength: float = MIN_WAVELENGTH,
                 max_wavelength: float = MAX_WAVELENGTH):
        super().__init__()
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be >= 1, got {num_frequencies}")
        if not 0 < min_wavelength <= max_wavelength:
            raise ValueError(f"need 0 < min_wavelength <= max_wavelength, got {min_wavelength}, {max_wavelength}")
        wavelengths = torch.logspace(math.log10(min_wavelength), math.log10(max_wavelength), num_frequencies,
                                     dtype=torch.float64)
        self.register_buffer("angular_frequency", (2 * math.pi / wavelengths).float(), persistent=False)
        self.in_dim = in_dim
        self.out_dim = in_dim * 2 * num_frequencies

    def forward(self, coordinates: Tensor) -> Tensor:
        phase = coordinates.float()[..., None] * self.angular_frequency  # (..., in_dim, F)
        return torch.cat([phase.sin(), phase.cos()], dim=-1).flatten(-2)


class FourierMLP(nn.Module):
    """Fourier features of coordinates, then Linear-GELU-Linear: a learned position embedding."""

    def __init__(self, out_dim: int, num_frequencies: int, *, hidden: Optional[int] = None,
                 min_wavelength: float = MIN_WAVELENGTH, max_wavelength: float = MAX_WAVELENGTH):
        super().__init__()
        self.fourier = FourierFeatures(num_frequencies, min_wavelength=min_wavelength, max_wavelength=max_wavelength)
        hidden = hidden or out_dim
        self.mlp = nn.Sequential(nn.Linear(self.fourier.out_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, coordinates: Tensor) -> Tensor:
        return self.mlp(self.fourier(coordinates))


def _event_field(data, name: str, num_events: int, device: Optional[torch.device]) -> Optional[Tensor]:
    """``data.<name>`` as a float tensor (num_events,), or None when the batch lacks it."""
    value = getattr(data, name, None)
    if value is None:
        return None
    value = torch.as_tensor(value, device=device).reshape(-1).float()
    if value.numel() != num_events:
        raise ValueError(f"data.{name} has {value.numel()} values for {num_events} events")
    return value


def condition_features(data, num_events: int, device: torch.device) -> Tensor:
    """The (num_events, 8) float32 conditioning of :data:`CONDITION_FEATURES` read from ``data``.

    Reads ``incident_energy`` (MeV), ``theta`` and ``phi`` (radians) where present. A missing
    field, a NaN, or a non-positive energy gives zeros with the field's known flag 0.
    """
    columns = []
    energy = _event_field(data, "incident_energy", num_events, device)
    if energy is None:
        energy = torch.full((num_events,), math.nan, device=device)
    energy_known = torch.isfinite(energy) & (energy > 0)
    log_energy = torch.log10(torch.where(energy_known, energy, ENERGY_SCALE_MEV) / ENERGY_SCALE_MEV)
    columns += [log_energy, energy_known.float()]
    for name in ("theta", "phi"):
        angle = _event_field(data, name, num_events, device)
        if angle is None:
            angle = torch.full((num_events,), math.nan, device=device)
        known = torch.isfinite(angle)
        angle = torch.where(known, angle, 0.0)
        columns += [angle.cos() * known, angle.sin() * known, known.float()]
    return torch.stack(columns, dim=1)


#: The event fields :class:`ConditionEncoder` reads, which :func:`hide_condition` can hide.
CONDITION_FIELDS = ("incident_energy", "theta", "phi")


def hide_condition(data, fields: Sequence[str] = CONDITION_FIELDS, events: Optional[Tensor] = None):
    """A shallow copy of ``data`` in which ``fields`` read as unknown (NaN) for ``events``.

    ``events`` is a boolean (num_events,) mask; None hides the fields of every event. ``data``
    itself is untouched (its tensors are shared, the hidden fields are new tensors), so a task
    can feed the copy to the backbone and still read its labels from the original: a regression
    of the incident energy must not see the incident energy in its conditioning.
    """
    unknown = set(fields) - set(CONDITION_FIELDS)
    if unknown:
        raise ValueError(f"cannot hide {sorted(unknown)}: the condition fields are {list(CONDITION_FIELDS)}")
    hidden = copy.copy(data)
    num_events = int(getattr(data, "num_graphs", 1) or 1)
    for name in fields:
        value = _event_field(data, name, num_events, None)
        if value is None:
            continue
        nan = torch.full_like(value, math.nan)
        hidden[name] = nan if events is None else torch.where(events.to(value.device), nan, value)
    return hidden


def geometry_indices(names, vocabulary: Sequence[str], num_events: int, device: torch.device) -> Tensor:
    """Tag of each event's geometry: 1 + its place in ``vocabulary``, :data:`UNKNOWN_GEOMETRY` (0) else.

    ``names`` is ``data.geometry``: a list of names (a Batch), one name (a Data) or None.
    """
    if names is None:
        names = [""] * num_events
    elif isinstance(names, str):
        names = [names] * num_events
    if len(names) != num_events:
        raise ValueError(f"data.geometry has {len(names)} names for {num_events} events")
    lookup = {name: i + 1 for i, name in enumerate(vocabulary)}
    return torch.tensor([lookup.get(name, UNKNOWN_GEOMETRY) for name in names], dtype=torch.long, device=device)


class ConditionEncoder(nn.Module):
    """Event conditioning vector (B, cond_dim) from energy, angles and an optional geometry tag.

    ``MLP(condition_features) + geometry_embedding(tag)``; the tag embedding exists only when
    ``geometry_vocabulary`` is not empty, and its row 0 is the "unknown geometry" slot.
    """

    def __init__(self, cond_dim: int, geometry_vocabulary: Sequence[str] = ()):
        super().__init__()
        self.geometry_vocabulary = tuple(geometry_vocabulary)
        self.mlp = nn.Sequential(nn.Linear(len(CONDITION_FEATURES), cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.geometry_embedding = (nn.Embedding(len(self.geometry_vocabulary) + 1, cond_dim)
                                   if self.geometry_vocabulary else None)

    def forward(self, data, num_events: int) -> Tensor:
        device = self.mlp[0].weight.device
        features = condition_features(data, num_events, device).to(self.mlp[0].weight.dtype)
        condition = self.mlp(features)
        if self.geometry_embedding is not None:
            tags = geometry_indices(getattr(data, "geometry", None), self.geometry_vocabulary, num_events, device)
            condition = condition + self.geometry_embedding(tags)
        return condition
