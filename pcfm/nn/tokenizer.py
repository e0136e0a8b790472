"""Point clouds to tokens: farthest-point centres, kNN groups, a mini-PointNet per group.

As in Point-MAE / PoLAr-MAE, each event of a ragged batch is covered by ``num_tokens``
centres (or ``ratio * n``; an event of ``n`` points gets at most ``n``) chosen by farthest-point
sampling, each centre gathers its ``group_size`` nearest points of the same event, and a
shared two-stage PointNet over ``[Fourier(point - centre), point features]`` max-pooled per group
gives the token embedding. The group membership is kept (:class:`Tokens`), so a decoder can get
the points of each group back, e.g. to reconstruct masked groups.

Before sampling, the points of each event are put in a canonical order (lexicographic in
x, y, z): FPS starts from an event's first point and both FPS and kNN break distance ties by
index, which on a regular cell grid happens all the time. With the canonical order the tokens
do not depend on the order the points came in (exactly, for distinct positions).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor, nn

from pcfm.nn.encoding import FourierFeatures, normalise_point_features
from pcfm.ops import fps, knn


@dataclass
class Tokens:
    """The tokens of a ragged batch of events, and where their points came from.

    Attributes:
        features: (T, C) token embeddings from the PointNet (no position embedding yet).
        pos: (T, 3) centre positions, mm, in the input frame.
        batch: (T,) event of each token; tokens are grouped by event, in FPS order within one.
        ptr: (B + 1,) token offsets: the tokens of event b are ``ptr[b]:ptr[b + 1]``.
        centre_point: (T,) index of the input point each token is centred on.
        group_token: (M,) token of each group member (grouped by token, ascending).
        group_point: (M,) input point index of each group member; a point can belong to
            several groups or none.
        centroid: (B, 3) each event's reference point, mm: the plain mean of its token centres
            over all tokens (zeros for an event without points). Positions the network sees are
            taken relative to it, so a shifted event gives the same output.
        condition: (B, cond_dim) event conditioning vector, or None before the backbone sets it.
    """

    features: Tensor
    pos: Tensor
    batch: Tensor
    ptr: Tensor
    centre_point: Tensor
    group_token: Tensor
    group_point: Tensor
    centroid: Tensor
    condition: Optional[Tensor] = None

    @property
    def num_events(self) -> int:
        return self.ptr.numel() - 1

    def select(self, keep: Tensor) -> "Tokens":
        """The tokens where the boolean mask ``keep`` (T,) is True, e.g. the visible ones.

        Group members of dropped tokens are dropped and ``group_token`` renumbered;
        ``centroid`` and ``condition`` are kept as they were, so positions stay in the frame of
        the full event.
        """
        keep = keep.to(device=self.pos.device, dtype=torch.bool)
        if keep.shape != self.batch.shape:
            raise ValueError(f"keep must be a boolean mask of shape {tuple(self.batch.shape)}, got {tuple(keep.shape)}")
        new_index = torch.cumsum(keep, 0) - 1
        member_kept = keep[self.group_token]
        return replace(
            self,
            features=self.features[keep], pos=self.pos[keep], batch=self.batch[keep],
            ptr=offsets(self.batch[keep], self.num_events), centre_point=self.centre_point[keep],
            group_token=new_index[self.group_token[member_kept]], group_point=self.group_point[member_kept],
        )

    def to(self, device) -> "Tokens":
        """A copy with every tensor on ``device``."""
        return Tokens(**{field.name: _to_device(getattr(self, field.name), device) for field in fields(self)})


def _to_device(value, device):
    return value.to(device) if isinstance(value, Tensor) else value


def offsets(batch: Tensor, num_events: int) -> Tensor:
    """CSR offsets (num_events + 1,) of a sorted event-index vector."""
    counts = torch.bincount(batch, minlength=num_events)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def canonical_order(pos: Tensor, batch: Tensor) -> Tensor:
    """Permutation sorting points by event, then x, then y, then z (stable: ties keep input order)."""
    order = torch.arange(pos.shape[0], device=pos.device)
    for key in (pos[:, 2], pos[:, 1], pos[:, 0], batch):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def segment_max(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Row-wise max of ``values`` (M, C) over rows sharing ``index`` (M,); 0 for an empty segment."""
    out = values.new_zeros(num_segments, values.shape[1])
    return out.scatter_reduce(0, index[:, None].expand_as(values), values, reduce="amax", include_self=False)


def segment_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Row-wise mean of ``values`` (M, C) over rows sharing ``index`` (M,); 0 for an empty segment."""
    total = values.new_zeros(num_segments, values.shape[1]).index_add(0, index, values)
    count = torch.bincount(index, minlength=num_segments).clamp(min=1)
    return total / count[:, None].to(total.dtype)


class PointNetTokenizer(nn.Module):
    """FPS + kNN grouping + two-stage PointNet (Point-MAE's mini-PointNet) on ragged batches.

    Stage 1 maps every member ``[Fourier(point - centre), normalised point features]`` to
    ``hidden`` channels and max-pools per group; stage 2 sees each member with its group's
    pooled vector appended, maps to ``width`` channels and max-pools again.
    """

    def __init__(self, width: int, hidden: int, *, in_features: int, group_size: int,
                 num_tokens: Optional[int], token_ratio: Optional[float], num_frequencies: int,
                 min_wavelength: float, max_wavelength: float, cluster_backend: str = "auto"):
        super().__init__()
        if (num_tokens is None) == (token_ratio is None):
            raise ValueError("give exactly one of num_tokens and token_ratio")
        self.group_size = group_size
        self.num_tokens = num_tokens
        self.token_ratio = token_ratio
        self.cluster_backend = cluster_backend
        self.offset_features = FourierFeatures(num_frequencies, min_wavelength=min_wavelength,
                                               max_wavelength=max_wavelength)
        self.first = nn.Sequential(nn.Linear(self.offset_features.out_dim + in_features, hidden), nn.LayerNorm(hidden),
                                   nn.GELU(), nn.Linear(hidden, hidden))
        self.second = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                    nn.Linear(hidden, width))

    def forward(self, pos: Tensor, x: Tensor, batch: Tensor, num_events: int, *, random_start: bool = False,
                generator: Optional[torch.Generator] = None) -> Tokens:
        """Tokens of points ``pos`` (N, 3) mm with features ``x`` (N, F), events by ``batch`` (N,) sorted."""
        order = canonical_order(pos, batch)
        sorted_pos = pos[order]  # batch is sorted, so batch[order] == batch
        picks = fps(sorted_pos, batch, num=self.num_tokens, ratio=self.token_ratio, random_start=random_start,
                    generator=generator, backend=self.cluster_backend)
        centre_point = order[picks]
        token_pos, token_batch = pos[centre_point], batch[centre_point]
        token, member = knn(sorted_pos, token_pos, self.group_size, batch, token_batch, backend=self.cluster_backend)
        group_point = order[member]
        # knn lists members query by query with the torch backend; sort in case a backend does not.
        by_token = torch.argsort(token, stable=True)
        group_token, group_point = token[by_token], group_point[by_token]

        num_tokens = token_pos.shape[0]
        offset = pos[group_point] - token_pos[group_token]
        inputs = torch.cat([self.offset_features(offset).to(x.dtype), normalise_point_features(x)[group_point]], 1)
        hidden = self.first(inputs)
        pooled = segment_max(hidden, group_token, num_tokens)
        hidden = self.second(torch.cat([hidden, pooled[group_token]], 1))
        return Tokens(
            features=segment_max(hidden, group_token, num_tokens), pos=token_pos, batch=token_batch,
            ptr=offsets(token_batch, num_events), centre_point=centre_point, group_token=group_token,
            group_point=group_point, centroid=segment_mean(token_pos, token_batch, num_events),
        )
