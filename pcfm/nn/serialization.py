"""Serialisation: order the points of each event along a space-filling curve and cut the order
into groups, level by level (as Point Transformer V3 does).

Points close on a Z-order (Morton) curve are close in space, so ``g`` consecutive points form a
compact group, and every point belongs to exactly one group: token groups cover every point of
every event, and a token count that grows with the event comes for free (``ceil(n / g)``).
Unlike farthest-point centres with kNN groups, groups do not overlap, so hiding a group for
masked modelling hides its points from every other token too. Groups of groups give the
coarser levels of a U-Net whose levels nest exactly.

The curve runs on each event's coordinates relative to its own lower corner, quantised at
:data:`GRID` (frame units), so the order does not change when an event is shifted by whole grid
steps; points sharing a grid cell are ordered by their coordinates (and points at one position
by energy), so the order does not depend on the order the points came in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

#: Quantisation step of the curve, in frame units (X0 or R_M): a 3 mm LArTPC voxel is 0.021 X0.
GRID = 1.0 / 256
#: Bits per axis of the Morton code (3 x 21 = 63 bits in an int64).
BITS = 21
_MASKS = ((32, 0x1F00000000FFFF), (16, 0x1F0000FF0000FF), (8, 0x100F00F00F00F00F), (4, 0x10C30C30C30C30C3),
          (2, 0x1249249249249249))


def _spread_bits(value: Tensor) -> Tensor:
    """Insert two zero bits between the 21 low bits of each int64 (the Morton interleave)."""
    value = value & ((1 << BITS) - 1)
    for shift, mask in _MASKS:
        value = (value | (value << shift)) & mask
    return value


def morton_codes(coordinates: Tensor, batch: Tensor, num_events: int, grid: float = GRID) -> Tensor:
    """Z-order code (N,) int64 of each point, relative to its event's lower corner."""
    if coordinates.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=coordinates.device)
    corner = torch.full((num_events, 3), torch.inf, device=coordinates.device, dtype=coordinates.dtype)
    corner = corner.scatter_reduce(0, batch[:, None].expand(-1, 3), coordinates, reduce="amin")
    cells = torch.floor((coordinates - corner[batch]) / grid).clamp(0, (1 << BITS) - 1).long()
    return _spread_bits(cells[:, 0]) | (_spread_bits(cells[:, 1]) << 1) | (_spread_bits(cells[:, 2]) << 2)


def serial_order(coordinates: Tensor, batch: Tensor, num_events: int, grid: float = GRID,
                 tiebreak: Optional[Tensor] = None) -> Tensor:
    """Permutation sorting points by event, then Morton code, then z, y, x, then ``tiebreak``
    (e.g. the energy: two deposits in one LArTPC voxel), then input order."""
    order = torch.arange(coordinates.shape[0], device=coordinates.device)
    keys = (() if tiebreak is None else (tiebreak,)) + (
        coordinates[:, 0], coordinates[:, 1], coordinates[:, 2], morton_codes(coordinates, batch, num_events, grid),
        batch)
    for key in keys:  # least significant first; stable sorts keep the earlier keys' order
        order = order[torch.argsort(key[order], stable=True)]
    return order


def offsets(batch: Tensor, num_events: int) -> Tensor:
    """CSR offsets (num_events + 1,) of a sorted event-index vector."""
    counts = torch.bincount(batch, minlength=num_events)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@dataclass
class Level:
    """One level of the hierarchy: its elements, in serial order, and where they go up.

    Attributes:
        batch: (M,) event of each element (sorted).
        ptr: (B + 1,) element offsets per event.
        parent: (M,) element of the next level up holding each element (None at the top).
    """

    batch: Tensor
    ptr: Tensor
    parent: Tensor | None = None


def group_levels(batch: Tensor, num_events: int, factors: tuple[int, ...]) -> list[Level]:
    """The nested levels of ``batch`` (points in serial order, events sorted): level 0 is the
    points, level ``l + 1`` cuts each event's level-``l`` elements, in order, into
    ``ceil(m / factors[l])`` runs of near-equal length (``floor`` or ``ceil`` of ``m / runs``, at
    most ``factors[l]``)."""
    levels = [Level(batch=batch, ptr=offsets(batch, num_events))]
    for factor in factors:
        below = levels[-1]
        counts = below.ptr[1:] - below.ptr[:-1]
        groups = torch.div(counts + factor - 1, factor, rounding_mode="floor")  # 0 for an empty event
        group_ptr = torch.cat([groups.new_zeros(1), groups.cumsum(0)])
        rank = torch.arange(below.batch.numel(), device=batch.device) - below.ptr[below.batch]
        within = torch.div(rank * groups[below.batch], counts[below.batch].clamp(min=1), rounding_mode="floor")
        below.parent = group_ptr[below.batch] + within
        upper_batch = torch.repeat_interleave(torch.arange(num_events, device=batch.device), groups)
        levels.append(Level(batch=upper_batch, ptr=group_ptr))
    return levels
