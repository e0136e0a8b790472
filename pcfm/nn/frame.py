"""Positions as the backbone reads them: each event's detector frame, in material units.

:func:`detector_coordinates` maps the points of a ragged batch through the
:class:`~pcfm.geometry.MaterialFrame` of each event's geometry (``data.geometry``): calorimeter
points become (x / R_M, y / R_M, depth in X0) about the front face and the particle axis, LArTPC
points their position in the volume in X0 of argon. Every length inside the backbone (token
offsets, neighbour search, attention distances, Fourier features) is in these units, so that
the same shower in two calorimeters of different materials gives (nearly) the same input.
A point cloud without a geometry name is read in centimetres about its local origin
(:data:`~pcfm.geometry.UNKNOWN_FRAME`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from pcfm import geometry as geometries
from pcfm.geometry import UNKNOWN_FRAME, MaterialFrame

#: Cell sizes in material units are floored at this before their log enters the network
#: (a size of 0 means "unknown": a point that is not a cell).
MIN_SIZE_UNITS = 1e-3


def event_geometry_names(data, num_events: int) -> list[str]:
    """``data.geometry`` as one name per event ("" where none is named)."""
    names = getattr(data, "geometry", None)
    if names is None:
        return [""] * num_events
    if isinstance(names, str):
        return [names] * num_events
    names = list(names)
    if len(names) != num_events:
        raise ValueError(f"data.geometry has {len(names)} names for {num_events} events")
    return [name or "" for name in names]


def frame_of(name: str) -> MaterialFrame:
    """The material frame of the geometry called ``name`` ("" -> :data:`UNKNOWN_FRAME`)."""
    return UNKNOWN_FRAME if not name else geometries.get(name).material_frame


def _by_frame(names: Sequence[str], point_batch: Tensor) -> list[tuple[MaterialFrame, Optional[Tensor]]]:
    """(frame, point indices or None for all points) for each geometry among ``names``."""
    unique = sorted(set(names))
    if len(unique) == 1:
        return [(frame_of(unique[0]), None)]
    event_group = torch.tensor([unique.index(name) for name in names], device=point_batch.device)
    point_group = event_group[point_batch]
    return [(frame_of(name), torch.nonzero(point_group == g).flatten()) for g, name in enumerate(unique)]


def detector_coordinates(pos_mm: Tensor, batch: Tensor, names: Sequence[str],
                         sizes_mm: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Frame coordinates (N, 3) float32 of points ``pos_mm`` whose events (``batch``) have the
    geometries ``names`` (one per event, see :func:`event_geometry_names`), and, given cell
    sizes (N, 3) mm, the sizes in the same units (else None)."""
    coordinates = torch.empty(pos_mm.shape, dtype=torch.float32, device=pos_mm.device)
    sizes = None if sizes_mm is None else torch.empty(sizes_mm.shape, dtype=torch.float32, device=pos_mm.device)
    if pos_mm.shape[0] == 0 or not names:
        return coordinates, sizes
    for frame, points in _by_frame(names, batch):
        part = pos_mm.float() if points is None else pos_mm[points].float()
        units = frame.to_units(part)
        converted = None if sizes_mm is None else frame.sizes_to_units(
            part, (sizes_mm if points is None else sizes_mm[points]).float())
        if points is None:
            coordinates, sizes = units, converted
            continue
        coordinates[points] = units
        if sizes is not None:
            sizes[points] = converted
    return coordinates, sizes
