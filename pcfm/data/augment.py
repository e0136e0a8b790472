"""Data augmentation by the symmetries of a detector: events moved in ways the physics allows.

A network fine-tuned on 100 labelled showers memorises them within a few hundred steps (its
training loss falls to zero while its validation loss rises); showing each event in a random one
of its detector's symmetries makes it learn the physics instead. Only symmetries that keep every
cell on the cell lattice are used, so an augmented event is an event the detector can record:

Each geometry knows its symmetries (:meth:`pcfm.geometry.Geometry.move_by_symmetry`):

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
from typing import Optional

import torch
from torch import Tensor

from pcfm import geometry as geometries
from pcfm.geometry import CylindricalGeometry


def _event_names(data, num_events: int) -> list[str]:
    names = getattr(data, "geometry", None)
    if names is None:
        return [""] * num_events
    return [names] * num_events if isinstance(names, str) else [name or "" for name in names]


def rotation_step(geometry: CylindricalGeometry) -> Optional[float]:
    """:meth:`pcfm.geometry.CylindricalGeometry.rotation_step` (kept here for its callers)."""
    return geometry.rotation_step()


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
        if not geometry.move_by_symmetry(part, phi, events, local[batch[points]], generator):
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
