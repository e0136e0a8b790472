"""Point clouds to tokens and back: a serialised U-Net over every point of every event.

:func:`group` (no learned parameters) puts each event's points on a space-filling curve in the
detector frame (:mod:`pcfm.nn.serialization`, :mod:`pcfm.nn.frame`) and cuts it into nested
groups: ``stages = (4, 4)`` makes groups of about 4 points, then groups of about 4 of those:
the tokens, about 16 points each. Every point is in exactly one token, and an event of ``n``
points gets about ``n / 16`` tokens.

:class:`HierarchicalTokenizer` embeds them (the down path of the U-Net):

1. each point: an MLP of Fourier features of its frame coordinates (absolute: depth in X0 and
   distance from the particle axis in a calorimeter, position in the volume in a LArTPC), its
   features (log energy, log cell sizes in frame units) and the shape of its neighbourhood
   (:func:`local_shape`: line, plane or blob, and its size), plus a linear map of its event's
   condition vector (incident energy, angles, geometry), so that a point's depth can be read
   against what a shower of that energy would do;
2. a local graph convolution over each point's ``point_k`` nearest points of its event
   (:class:`LocalConvolution`: relative positions, EdgeConv-style max), the local shape that
   per-point tasks need (a track's line, a shower's blob, a Michel electron at a track's end);
3. at each stage, a PointNet over each group (its members' features and offsets from the
   group's mean position, max-pooled) gives the next level's features, up to the tokens.

The down-path features of every level are kept (``Tokens.skips``) for :class:`PointDecoder`
(the up path): from the encoded tokens back down, each level's elements combine their skip
features with their parent's, ending with a second local convolution over the points, so every
point gets features from its neighbourhood and from the whole event.

Masked modelling embeds only the visible tokens' points (``visible``): the neighbour graph and
the groups are then restricted to them, so nothing of a hidden token reaches a visible one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from pcfm.nn.encoding import FourierFeatures
from pcfm.nn.frame import MIN_SIZE_UNITS
from pcfm.nn.serialization import Level, group_levels, offsets, serial_order
from pcfm.ops import knn


def gather(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` for an integer ``index`` of any shape, through ``index_select`` (its
    backward is several times faster on CPU than that of advanced indexing)."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])


def segment_max(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Row-wise max of ``values`` (M, C) over rows sharing ``index`` (M,); 0 for an empty segment."""
    out = values.new_zeros(num_segments, values.shape[1])
    return out.scatter_reduce(0, index[:, None].expand_as(values), values, reduce="amax", include_self=False)


def segment_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Row-wise mean of ``values`` (M, C) over rows sharing ``index`` (M,); 0 for an empty segment."""
    total = values.new_zeros(num_segments, values.shape[1]).index_add(0, index, values)
    count = torch.bincount(index, minlength=num_segments).clamp(min=1)
    return total / count[:, None].to(total.dtype)


@dataclass
class Tokens:
    """The tokens of a ragged batch of B events, and the hierarchy of points under them.

    Points are kept in serial order (``order``); level 0 of the hierarchy is those points, the
    top level the tokens. Attributes:

        pos: (T, 3) token positions: the mean frame coordinates of their points.
        batch: (T,) event of each token (sorted); ptr: (B + 1,) token offsets per event.
        order: (N,) input index of each point in serial order (the point order of every level-0
            tensor here).
        point_pos: (N, 3) frame coordinates of the points, in serial order.
        point_features: (N, F) normalised point features (log energy, log sizes), serial order.
        levels: the :class:`~pcfm.nn.serialization.Level` s from points to tokens; ``levels[l].parent``
            maps level ``l`` to level ``l + 1``.
        level_pos: (M_l, 3) mean frame coordinates of the elements of every level.
        energy: (T,) summed energy of each token's points (MeV), for energy-weighted read-outs.
        features: (T, C) token embeddings (zeros for tokens that were not embedded), or None
            before :meth:`HierarchicalTokenizer.forward`.
        skips: down-path features of each level below the tokens, for the decoder.
        point_graph: (N, point_k) nearest points of each point (:func:`neighbour_table`).
        visible: (T,) tokens whose points were embedded (None: all).
        condition: (B, cond_dim) event conditioning vector, set by the backbone.
    """

    pos: Tensor
    batch: Tensor
    ptr: Tensor
    order: Tensor
    point_pos: Tensor
    point_features: Tensor
    levels: list
    level_pos: list
    energy: Optional[Tensor] = None
    features: Optional[Tensor] = None
    skips: Optional[list] = None
    point_graph: Optional[Tensor] = None
    visible: Optional[Tensor] = None
    condition: Optional[Tensor] = None

    @property
    def num_events(self) -> int:
        return self.ptr.numel() - 1

    @property
    def point_token(self) -> Tensor:
        """(N,) token of each point, in serial order (ascending)."""
        index = self.levels[0].parent if len(self.levels) > 1 else torch.arange(self.order.numel())
        for level in self.levels[1:-1]:
            index = level.parent[index]
        return index

    @property
    def group_token(self) -> Tensor:
        """(N,) token of each group member, grouped by token: :attr:`point_token`."""
        return self.point_token

    @property
    def group_point(self) -> Tensor:
        """(N,) input index of each group member (aligned with :attr:`group_token`): :attr:`order`."""
        return self.order

    def select(self, keep: Tensor) -> "Tokens":
        """The tokens where the boolean mask ``keep`` (T,) is True, e.g. the visible ones, for
        :meth:`~pcfm.nn.Backbone.encode`: features, positions, events and condition only (no
        hierarchy: a selection cannot be decoded back to points)."""
        keep = keep.to(device=self.pos.device, dtype=torch.bool)
        if keep.shape != self.batch.shape:
            raise ValueError(f"keep must be a boolean mask of shape {tuple(self.batch.shape)}, got {tuple(keep.shape)}")
        return replace(self, pos=self.pos[keep], batch=self.batch[keep], ptr=offsets(self.batch[keep], self.num_events),
                       features=None if self.features is None else self.features[keep],
                       energy=None if self.energy is None else self.energy[keep], skips=None,
                       point_graph=None, visible=None)

    def to(self, device) -> "Tokens":
        """A copy with every tensor on ``device``."""
        return Tokens(**{field.name: _to_device(getattr(self, field.name), device) for field in fields(self)})


def _to_device(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, Level):
        return Level(*(None if v is None else v.to(device) for v in (value.batch, value.ptr, value.parent)))
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def group(coordinates: Tensor, point_features: Tensor, batch: Tensor, num_events: int,
          stages: Sequence[int]) -> Tokens:
    """Serialise the points (frame coordinates (N, 3), features (N, F), sorted ``batch``) and cut
    them into the nested groups of ``stages`` (module docstring): a :class:`Tokens` without features."""
    order = serial_order(coordinates, batch, num_events, tiebreak=point_features[:, 0])
    point_pos, point_batch = coordinates[order], batch[order]
    levels = group_levels(point_batch, num_events, tuple(stages))
    # Each level's position is the mean of its points (a mean of means would weigh uneven groups).
    level_pos, index = [point_pos], torch.arange(point_pos.shape[0], device=point_pos.device)
    for below, level in zip(levels[:-1], levels[1:]):
        index = below.parent[index]
        level_pos.append(segment_mean(point_pos, index, level.batch.numel()))
    top, serial_features = levels[-1], point_features[order]
    energy = torch.zeros(top.batch.numel(), device=coordinates.device).index_add(
        0, index, serial_features[:, 0].float().exp())
    return Tokens(pos=level_pos[-1], batch=top.batch, ptr=top.ptr, order=order, point_pos=point_pos,
                  point_features=serial_features, levels=levels, level_pos=level_pos, energy=energy)


def restrict(tokens: Tokens, visible: Tensor) -> tuple[list[Level], list[Tensor], list[Tensor]]:
    """The hierarchy of ``tokens`` restricted to the elements under ``visible`` tokens: levels
    (renumbered), positions, and each level's kept indices into the full level."""
    keeps = [visible]
    for level in reversed(tokens.levels[:-1]):
        keeps.insert(0, keeps[0][level.parent])
    new_index = [torch.cumsum(keep, 0) - 1 for keep in keeps]
    levels, positions, kept = [], [], []
    num_events = tokens.num_events
    for l, (level, keep) in enumerate(zip(tokens.levels, keeps)):
        batch = level.batch[keep]
        parent = None if level.parent is None else new_index[l + 1][level.parent[keep]]
        levels.append(Level(batch=batch, ptr=offsets(batch, num_events), parent=parent))
        positions.append(tokens.level_pos[l][keep])
        kept.append(torch.nonzero(keep).flatten())
    return levels, positions, kept


def neighbour_table(pos: Tensor, batch: Tensor, k: int, backend: str = "auto") -> Tensor:
    """(N, k) indices of each point's ``k`` nearest points of its event, itself included; an
    event of fewer than ``k`` points pads its rows with the point itself (a repeated neighbour
    changes no max)."""
    query, neighbour = knn(pos, pos, k, batch, batch, backend=backend)
    start = offsets(query, pos.shape[0])
    slot = torch.arange(query.numel(), device=pos.device) - start[query]
    table = torch.arange(pos.shape[0], device=pos.device)[:, None].repeat(1, k)
    table[query, slot] = neighbour
    return table


#: Columns of :func:`local_shape`.
SHAPE_FEATURES = 4


def local_shape(pos: Tensor, neighbours: Tensor) -> Tensor:
    """(N, 4) shape of each point's neighbourhood: the eigenvalues of the covariance of its
    neighbours' positions, sorted and divided by their sum (a line gives (1, 0, 0), a plane
    (1/2, 1/2, 0), a blob (1/3, 1/3, 1/3)), and log10 of the neighbours' RMS distance (frame units).
    Tracks, showers and isolated deposits differ in exactly these, whatever the cell size."""
    offset = gather(pos, neighbours).double()
    offset = offset - offset.mean(1, keepdim=True)
    covariance = offset.transpose(1, 2) @ offset / neighbours.shape[1]
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(1).clamp(min=0)  # descending
    total = eigenvalues.sum(1, keepdim=True)
    shares = torch.where(total > 0, eigenvalues / total.clamp(min=1e-30), 0.0)
    spread = torch.log10(total.sqrt().clamp(min=MIN_SIZE_UNITS))
    return torch.cat([shares, spread], 1).to(pos.dtype)


class LocalConvolution(nn.Module):
    """EdgeConv over each point's neighbours, with scale-free offsets:
    ``h_i + W max_j MLP([h_i, h_j - h_i, (p_j - p_i) / rho_i, |p_j - p_i| / rho_i])``.

    ``rho_i`` is the mean distance from point i to its neighbours, so the offsets describe the
    local shape (a line, a plane, a blob) whatever the density of the detector's cells; the
    scale itself enters as ``log rho_i``. The first layer of the MLP is applied per point and per
    offset and summed (the same linear map, without an (N, k, 2C) concatenation).
    """

    def __init__(self, width: int):
        super().__init__()
        self.centre = nn.Linear(width + 1, width)  # [h_i, log rho_i]; also takes -h_i of h_j - h_i
        self.neighbour = nn.Linear(width, width, bias=False)
        self.offset = nn.Linear(4, width, bias=False)
        self.message = nn.Sequential(nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width))
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor, pos: Tensor, neighbours: Tensor) -> Tensor:
        """``h`` (N, C), ``pos`` (N, 3), ``neighbours`` (N, k) from :func:`neighbour_table`."""
        offset = (gather(pos, neighbours) - pos[:, None, :]).to(h.dtype)
        distance = offset.norm(dim=2, keepdim=True)
        rho = distance.mean(1, keepdim=True).clamp(min=MIN_SIZE_UNITS)
        centre = self.centre(torch.cat([h, rho[:, 0].log()], 1))
        projected = self.neighbour(h)
        pre = (centre - projected)[:, None, :] + gather(projected, neighbours) + self.offset(
            torch.cat([offset, distance], 2) / rho)
        return h + self.out(self.message(pre).max(1).values)


class GroupPooling(nn.Module):
    """A PointNet over groups: ``max over members of MLP([h_member, Fourier(p_member - p_group)])``."""

    def __init__(self, in_width: int, out_width: int, fourier: FourierFeatures):
        super().__init__()
        self.fourier = fourier
        self.mlp = nn.Sequential(nn.Linear(in_width + fourier.out_dim, out_width), nn.LayerNorm(out_width), nn.GELU(),
                                 nn.Linear(out_width, out_width))
        self.norm = nn.LayerNorm(out_width)

    def forward(self, h: Tensor, pos: Tensor, parent: Tensor, parent_pos: Tensor) -> Tensor:
        offset = self.fourier(pos - gather(parent_pos, parent)).to(h.dtype)
        return self.norm(segment_max(self.mlp(torch.cat([h, offset], 1)).to(h.dtype), parent, parent_pos.shape[0]))


class GroupUnpooling(nn.Module):
    """The up step: ``skip + MLP([skip, h_parent, Fourier(p - p_parent)])`` at each child."""

    def __init__(self, parent_width: int, width: int, fourier: FourierFeatures):
        super().__init__()
        self.fourier = fourier
        self.mlp = nn.Sequential(nn.Linear(width + parent_width + fourier.out_dim, width), nn.LayerNorm(width),
                                 nn.GELU(), nn.Linear(width, width))

    def forward(self, skip: Tensor, pos: Tensor, parent_h: Tensor, parent: Tensor, parent_pos: Tensor) -> Tensor:
        offset = self.fourier(pos - gather(parent_pos, parent)).to(skip.dtype)
        return skip + self.mlp(torch.cat([skip, gather(parent_h, parent).to(skip.dtype), offset], 1)).to(skip.dtype)


def level_widths(width: int, point_width: int, num_stages: int) -> list[int]:
    """Channels of each level below the tokens: ``point_width`` doubling per stage, at most ``width``."""
    return [min(width, point_width * 2 ** l) for l in range(num_stages)]


class HierarchicalTokenizer(nn.Module):
    """The down path (module docstring): point embedding, local convolution, group pooling."""

    def __init__(self, width: int, *, in_features: int, cond_dim: int, stages: Sequence[int], point_width: int,
                 point_k: int, fourier: FourierFeatures, absolute_fourier: FourierFeatures,
                 cluster_backend: str = "auto"):
        super().__init__()
        self.stages, self.point_k, self.cluster_backend = tuple(stages), int(point_k), cluster_backend
        widths = level_widths(width, point_width, len(self.stages)) + [width]
        self.absolute_fourier = absolute_fourier
        self.embed = nn.Sequential(nn.Linear(absolute_fourier.out_dim + in_features + SHAPE_FEATURES, widths[0]),
                                   nn.LayerNorm(widths[0]),
                                   nn.GELU(), nn.Linear(widths[0], widths[0]))
        self.condition = nn.Linear(cond_dim, widths[0])
        nn.init.zeros_(self.condition.weight)  # as AdaLN: the conditioning acts once training says it should
        nn.init.zeros_(self.condition.bias)
        self.local = LocalConvolution(widths[0]) if self.point_k > 0 else None
        self.pools = nn.ModuleList(GroupPooling(widths[l], widths[l + 1], fourier) for l in range(len(self.stages)))

    def point_graph(self, pos: Tensor, batch: Tensor) -> Tensor:
        """(N, point_k) each point's nearest points of its event (:func:`neighbour_table`)."""
        return neighbour_table(pos, batch, self.point_k, self.cluster_backend)

    def forward(self, tokens: Tokens, condition: Tensor, visible: Optional[Tensor] = None,
                dtype: torch.dtype = torch.float32) -> Tokens:
        """``tokens`` with features (and skips), given the events' condition vectors (B, cond_dim),
        which every point's embedding sees; only the points under ``visible`` tokens when given."""
        if visible is None:
            levels, positions, kept = tokens.levels, tokens.level_pos, None
        else:
            levels, positions, kept = restrict(tokens, visible.to(torch.bool))
        point_features = tokens.point_features if kept is None else tokens.point_features[kept[0]]
        graph = None if self.local is None else self.point_graph(positions[0], levels[0].batch)
        shape = (positions[0].new_zeros(positions[0].shape[0], SHAPE_FEATURES) if graph is None
                 else local_shape(positions[0], graph))
        h = self.embed(torch.cat([self.absolute_fourier(positions[0]).to(dtype), point_features.to(dtype),
                                  shape.to(dtype)], 1))
        h = (h + self.condition(condition.to(dtype))[levels[0].batch]).to(dtype)
        if graph is not None:
            h = self.local(h, positions[0], graph).to(dtype)
        skips = [h]
        for l, pool in enumerate(self.pools):
            h = pool(h, positions[l], levels[l].parent, positions[l + 1]).to(dtype)
            skips.append(h)
        features = skips.pop()
        if kept is not None:
            full = features.new_zeros(tokens.pos.shape[0], features.shape[1])
            full[kept[-1]] = features
            features = full
        return replace(tokens, features=features, skips=skips if kept is None else None,
                       point_graph=graph if kept is None else None, visible=visible)


class PointDecoder(nn.Module):
    """The up path (module docstring): encoded tokens back to every point, (N, width) in input order."""

    def __init__(self, width: int, *, stages: Sequence[int], point_width: int, point_k: int,
                 fourier: FourierFeatures):
        super().__init__()
        widths = level_widths(width, point_width, len(stages)) + [width]
        self.unpools = nn.ModuleList(GroupUnpooling(widths[l + 1], widths[l], fourier) for l in range(len(stages)))
        self.local = LocalConvolution(widths[0]) if point_k > 0 else None
        self.out = nn.Sequential(nn.LayerNorm(widths[0]), nn.Linear(widths[0], width))

    def forward(self, tokens: Tokens, token_features: Tensor) -> Tensor:
        if tokens.skips is None:
            raise ValueError("these tokens carry no down-path features: decode tokens embedded without `visible`")
        h = token_features
        for l in reversed(range(len(self.unpools))):
            h = self.unpools[l](tokens.skips[l], tokens.level_pos[l], h, tokens.levels[l].parent,
                                tokens.level_pos[l + 1])
        if self.local is not None:
            h = self.local(h, tokens.point_pos, tokens.point_graph)
        serial = self.out(h)
        out = torch.empty_like(serial)
        out[tokens.order] = serial
        return out


def normalise_point_features(x: Tensor, size_units: Optional[Tensor]) -> Tensor:
    """(N, 4) network inputs of a point: log(E / MeV) and log cell sizes in frame units
    (radial or x, arc or y, depth), floored at :data:`~pcfm.nn.frame.MIN_SIZE_UNITS` (0: unknown)."""
    if size_units is None:
        size_units = torch.zeros_like(x[:, 1:4])
    return torch.cat([x[:, :1].float(), torch.log(size_units.float().clamp(min=MIN_SIZE_UNITS)) / math.log(10.0)], 1)
