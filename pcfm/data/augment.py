"""Data augmentation by the symmetries of a detector: events moved in ways the physics allows.

A network fine-tuned on 100 labelled showers memorises them within a few hundred steps (its
training loss falls to zero while its validation loss rises); showing each event in a random one
of its detector's symmetries makes it learn the physics instead. Only symmetries that keep every
cell on the cell lattice are used, so an augmented event is an event the detector can record:

- cylindrical calorimeters: rotations about the mesh axis by multiples of the angular bin (the
  largest step common to every layer), and the reflection y -> -y; the incident direction's
  azimuth ``phi`` turns with the event (a known ``theta`` is unchanged);
- voxel grids (LArTPC): reflections of each axis about the centre of the volume, and swaps of
  axes of equal length (the 48 symmetries of a cube for a cubic volume).

:func:`augment_by_symmetry` draws one symmetry per event. Events without a known geometry are
left as they are.
"""
from __future__ import annotations

import copy
import math
from functools import reduce
from typing import Optional

import torch
from torch import Tensor

from pcfm import geometry as geometries
from pcfm.geometry import CylindricalGeometry, VoxelGridGeometry


def _event_names(data, num_events: int) -> list[str]:
    names = getattr(data, "geometry", None)
    if names is None:
        return [""] * num_events
    return [names] * num_events if isinstance(names, str) else [name or "" for name in names]


def rotation_step(geometry: CylindricalGeometry) -> Optional[float]:
    """The smallest rotation (radians) about the mesh axis that maps every layer's angular bins
    onto themselves, or None when only the identity does (a layer of one angular bin)."""
    common = reduce(math.gcd, (layer.n_alpha for layer in geometry.layers))
    return None if common < 2 else 2 * math.pi / common


def _calorimeter(pos: Tensor, phi: Optional[Tensor], geometry: CylindricalGeometry, events: Tensor,
                 point_event: Tensor, generator: Optional[torch.Generator]) -> None:
    """Rotate and reflect, in place, the points (``point_event``: local event of each) of ``events``."""
    n = events.numel()
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    step = rotation_step(geometry)
    angle = torch.zeros(n) if step is None else torch.randint(
        0, round(2 * math.pi / step), (n,), generator=generator).double() * step
    flip, angle = flip.to(pos.device), angle.to(pos.device)
    x, y = pos[:, 0].double(), pos[:, 1].double() * flip[point_event]
    cos, sin = angle.cos()[point_event], angle.sin()[point_event]
    pos[:, 0], pos[:, 1] = (x * cos - y * sin).to(pos.dtype), (x * sin + y * cos).to(pos.dtype)
    if phi is not None:
        known = torch.isfinite(phi[events])
        turned = torch.remainder(phi[events].double() * flip + angle + math.pi, 2 * math.pi) - math.pi
        phi[events] = torch.where(known, turned.to(phi.dtype), phi[events])


def _voxel_grid(pos: Tensor, geometry: VoxelGridGeometry, events: Tensor, point_event: Tensor,
                generator: Optional[torch.Generator]) -> None:
    """Reflect each axis about the volume's centre and permute equal-length axes, in place."""
    n = events.numel()
    centre = torch.as_tensor(geometry.origin_mm + geometry.extent_mm / 2, dtype=torch.float64, device=pos.device)
    relative = pos.double() - centre
    shape = torch.tensor(geometry.shape)
    # a random permutation among axes of equal length: sort random keys within each length class
    keys = torch.rand(n, 3, generator=generator) + shape.double()[None, :] * 10
    permutation = torch.argsort(keys, dim=1).to(pos.device)  # equal lengths stay in their own class
    signs = torch.where(torch.rand(n, 3, generator=generator) < 0.5, -1.0, 1.0).to(pos.device)
    order = torch.argsort(shape.double()[None, :].expand(n, 3), dim=1, stable=True).to(pos.device)
    target = torch.empty_like(permutation)
    target.scatter_(1, order, permutation)  # axis j goes to axis target[j], within its length class
    moved = torch.empty_like(relative)
    moved.scatter_(1, target[point_event], relative * signs[point_event])
    pos.copy_((moved + centre).to(pos.dtype))


def augment_by_symmetry(data, generator: Optional[torch.Generator] = None):
    """A shallow copy of a Data / Batch with each event moved by a random symmetry of its
    geometry (module docstring): new ``pos`` (and ``phi``); every other field is shared. A
    ``cell`` field is recomputed for the moved points."""
    out = copy.copy(data)
    pos = data.pos.clone()
    batch = getattr(data, "batch", None)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    num_events = int(getattr(data, "num_graphs", 1) or 1)
    phi = getattr(data, "phi", None)
    phi = None if phi is None else torch.as_tensor(phi).reshape(-1).clone()
    names = _event_names(data, num_events)
    for name in sorted(set(names) - {""}):
        geometry = geometries.get(name)
        events = torch.tensor([i for i, event_name in enumerate(names) if event_name == name], device=pos.device)
        local = torch.full((num_events,), -1, dtype=torch.long, device=pos.device)
        local[events] = torch.arange(events.numel(), device=pos.device)
        points = torch.nonzero(local[batch] >= 0).flatten()
        part = pos[points]
        if isinstance(geometry, CylindricalGeometry):
            _calorimeter(part, phi, geometry, events, local[batch[points]], generator)
        elif isinstance(geometry, VoxelGridGeometry):
            _voxel_grid(part, geometry, events, local[batch[points]], generator)
        else:
            continue
        pos[points] = part
        if getattr(data, "cell", None) is not None:
            cell = out.cell.clone() if out.cell is data.cell else out.cell
            cell[points] = torch.from_numpy(geometry.locate(part.detach().cpu().numpy())).to(cell.device)
            out.cell = cell
    out.pos = pos
    if phi is not None:
        out.phi = phi.reshape(data.phi.shape) if isinstance(data.phi, Tensor) else phi
    return out
