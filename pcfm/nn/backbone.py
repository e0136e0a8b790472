"""The geometry-agnostic backbone shared by every pretraining and fine-tuning task.

``Backbone(data)`` runs, on a ragged PyG batch of point clouds (:mod:`pcfm.data.pointcloud`):

1. :meth:`Backbone.group`: every point's position in its event's detector frame, in material
   units (:mod:`pcfm.nn.frame`: depth in X0 from the calorimeter's front face and distance from
   the particle axis in Moliere radii; position in the TPC volume in X0 of argon), then the
   points on a space-filling curve, cut into nested groups: tokens of about
   ``prod(stages)`` points that cover every point (:mod:`pcfm.nn.serialization`);
2. :meth:`Backbone.embed`: the down path of a U-Net (:class:`~pcfm.nn.tokenizer.HierarchicalTokenizer`:
   point MLP, a local graph convolution over each point's nearest points, PointNet pooling per
   group) gives the token features, and the event conditioning vector is computed;
3. :meth:`Backbone.encode`: a position embedding of each token's absolute frame position, then
   ``depth`` transformer-GNN blocks (local kNN attention, global event attention) and a final
   adaptive norm;
4. :meth:`Backbone.propagate`: the up path (:class:`~pcfm.nn.tokenizer.PointDecoder`): per-point
   features from the tokens back through every level, with the down path's features as skips;
5. :meth:`Backbone.pool`: one embedding per event, a linear map of the mean, the max and the
   energy-weighted mean of its tokens, and the energy-weighted mean of its points' features (as
   in energy flow networks: sums over a shower weighted by energy share are what layer profiles
   and shower depths are made of).

What is absolute and what is relative: a calorimeter shower's depth and distance from the axis
enter absolutely (point and token embeddings), so where a shower starts is visible; offsets
inside groups, neighbour graphs and attention distances are relative. A LArTPC event's absolute
position in the volume enters the embeddings too, but its local features are all relative
(the physics is translation invariant away from the walls).

Masked modelling calls the steps itself: ``group`` once, draw the hidden tokens, ``embed`` only
the visible tokens' points (``visible``), ``encode(tokens, keep_mask)`` the visible tokens, and
read the hidden tokens' points from ``tokens.group_point``.

Sizes come as presets (:data:`BACKBONE_PRESETS`: tiny for CPU tests and the quickstart, small
and base for GPU training) and the whole configuration round-trips through a plain dict
(:meth:`BackboneConfig.to_dict`), which checkpoints store.

Host synchronisations: kNN (:mod:`pcfm.ops.cluster`), the geometry lookup by name and the input
checks of the attention ops read sizes on the host, so a compiled graph breaks there; the rest
(MLPs, norms, attention maths) has no ``.item()`` and compiles.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from pcfm.nn.blocks import AdaptiveLayerNorm, TransformerGNNBlock, run_token_blocks
from pcfm.nn.encoding import MAX_WAVELENGTH, MIN_WAVELENGTH, ConditionEncoder, FourierFeatures, FourierMLP
from pcfm.nn.frame import detector_coordinates, event_geometry_names
from pcfm.nn.tokenizer import (HierarchicalTokenizer, PointDecoder, Tokens, group, level_widths,
                               normalise_point_features, segment_max, segment_mean)

#: Geometries with their own tag embedding by default (others use the "unknown" slot).
DEFAULT_GEOMETRY_VOCABULARY = ("calochallenge-ds1-photons", "calochallenge-ds1-pions", "calochallenge-ds2",
                               "calochallenge-ds3", "par04-scipb", "lartpc-768")
#: Fields of the pcfm 0.1 backbone (event-centroid frame, farthest-point tokens), which this one replaced.
LEGACY_FIELDS = ("num_tokens", "token_ratio", "group_size", "group_hidden", "min_wavelength_mm",
                 "max_wavelength_mm", "distance_scales_mm")


@dataclass(frozen=True)
class BackboneConfig:
    """Every size and choice of a :class:`Backbone`; see :data:`BACKBONE_PRESETS`.

    Lengths are in frame units (X0 / Moliere radii, :mod:`pcfm.nn.frame`).

    Attributes:
        width: token channels C. depth: transformer-GNN blocks. heads: attention heads.
        mlp_ratio: hidden width of the block MLPs, times C.
        cond_dim: width of the event conditioning vector.
        in_features: columns of ``data.x`` (:data:`pcfm.data.pointcloud.POINT_FEATURES`).
        stages: group sizes of the U-Net levels: points in groups of about ``stages[0]``, those
            in groups of about ``stages[1]``, ...; the last groups are the tokens, of at most
            :attr:`group_size` = ``prod(stages)`` points.
        point_width: channels at the point level (doubling per level, at most ``width``).
        point_k: neighbours of each point in the local graph convolutions (0: none).
        local_k: neighbours of each token in the local-attention graph (itself included).
        num_frequencies: Fourier frequencies per coordinate, wavelengths log-spaced from
            ``min_wavelength`` to ``max_wavelength`` for relative positions (offsets within groups
            and between neighbours) and from ``min_absolute_wavelength`` for absolute positions:
            finer absolute features would only name cells, not physics.
        distance_scales: global-attention heads start with distance penalties 1/L per unit,
            L log-spaced over this range.
        geometry_vocabulary: geometry names with a learned tag embedding (an empty tuple turns
            tags off); any other name gets the "unknown" slot.
        attention_backend: ``backend`` for :mod:`pcfm.ops.attention` ("auto", "reference", ...).
        cluster_backend: ``backend`` for kNN in :mod:`pcfm.ops.cluster`.
    """

    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    cond_dim: int = 64
    in_features: int = 4
    stages: tuple[int, ...] = (4, 4)
    point_width: int = 32
    point_k: int = 16
    local_k: int = 8
    num_frequencies: int = 12
    min_wavelength: float = MIN_WAVELENGTH
    max_wavelength: float = MAX_WAVELENGTH
    min_absolute_wavelength: float = 0.5
    distance_scales: tuple[float, float] = (0.5, 50.0)
    geometry_vocabulary: tuple[str, ...] = DEFAULT_GEOMETRY_VOCABULARY
    attention_backend: str = "auto"
    cluster_backend: str = "auto"

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        # Lists (from a dict / JSON / YAML) become tuples so that configs compare and hash.
        object.__setattr__(self, "stages", tuple(int(v) for v in self.stages))
        object.__setattr__(self, "distance_scales", tuple(float(v) for v in self.distance_scales))
        object.__setattr__(self, "geometry_vocabulary", tuple(self.geometry_vocabulary))
        if not self.stages or min(self.stages) < 2:
            raise ValueError(f"stages must be one or more group sizes >= 2, got {list(self.stages)}")
        if self.point_k < 0 or self.local_k < 1:
            raise ValueError(f"need point_k >= 0 and local_k >= 1, got {self.point_k}, {self.local_k}")

    @property
    def absolute_wavelengths(self) -> dict[str, float]:
        """Keywords of the Fourier features of absolute positions."""
        return {"min_wavelength": self.min_absolute_wavelength, "max_wavelength": self.max_wavelength}

    @property
    def group_size(self) -> int:
        """Most points in one token: ``prod(stages)``."""
        return math.prod(self.stages)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for checkpoints, JSON and YAML."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error (a typo would go unnoticed)."""
        legacy = sorted(set(values) & set(LEGACY_FIELDS))
        if legacy:
            raise ValueError(f"a backbone with {legacy} is the pcfm 0.1 backbone (positions relative to the event "
                             f"centroid, farthest-point tokens), which pcfm 0.2 replaced; pretrain it again")
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown BackboneConfig field(s): {sorted(unknown)}")
        return cls(**values)


#: Sizes by name. Parameter counts (default vocabulary) are checked by the tests.
BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    "tiny": BackboneConfig(width=64, depth=4, heads=4, mlp_ratio=2.0, cond_dim=64, stages=(4, 4), point_width=32,
                           point_k=16, local_k=8),
    "small": BackboneConfig(width=256, depth=6, heads=8, mlp_ratio=4.0, cond_dim=256, stages=(4, 8), point_width=64,
                            point_k=16, local_k=16),
    "base": BackboneConfig(width=384, depth=10, heads=6, mlp_ratio=4.0, cond_dim=256, stages=(4, 8),
                           point_width=96, point_k=16, local_k=16),
}


class BackboneOutput(NamedTuple):
    """What :meth:`Backbone.forward` returns for a batch of B events, N points, T tokens."""

    token_features: Tensor  # (T, C)
    token_pos: Tensor  # (T, 3) frame units
    token_batch: Tensor  # (T,)
    token_ptr: Tensor  # (B + 1,)
    point_features: Optional[Tensor]  # (N, C), in the input point order (None with points=False)
    pooled: Tensor  # (B, C)
    tokens: Tokens  # the tokenisation, with its group membership


def _points(data) -> tuple[Tensor, Tensor, Tensor, int]:
    """``pos``, ``x``, ``batch`` and the number of events of a Data or Batch."""
    pos, x = data.pos, data.x
    batch = getattr(data, "batch", None)
    if batch is None:
        batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        num_events = 1
    else:
        num_events = int(data.num_graphs)
    return pos, x, batch, num_events


class Backbone(nn.Module):
    """Detector frame + serialised U-Net tokeniser + transformer-GNN encoder + read-outs (module docstring)."""

    def __init__(self, config: Optional[BackboneConfig] = None):
        super().__init__()
        config = config or BackboneConfig()
        self.config = config
        c = config
        wavelengths = dict(min_wavelength=c.min_wavelength, max_wavelength=c.max_wavelength)
        self.fourier = FourierFeatures(c.num_frequencies, **wavelengths)
        absolute = c.absolute_wavelengths
        self.condition_encoder = ConditionEncoder(c.cond_dim, c.geometry_vocabulary)
        self.tokenizer = HierarchicalTokenizer(c.width, in_features=c.in_features, cond_dim=c.cond_dim, stages=c.stages,
                                               point_width=c.point_width, point_k=c.point_k, fourier=self.fourier,
                                               absolute_fourier=FourierFeatures(c.num_frequencies, **absolute),
                                               cluster_backend=c.cluster_backend)
        self.position_embedding = FourierMLP(c.width, c.num_frequencies, **absolute)
        self.blocks = nn.ModuleList(
            TransformerGNNBlock(c.width, c.heads, c.cond_dim, self.fourier.out_dim, mlp_ratio=c.mlp_ratio,
                                distance_scales=c.distance_scales, attention_backend=c.attention_backend)
            for _ in range(c.depth))
        self.final_norm = AdaptiveLayerNorm(c.width, c.cond_dim)
        self.decoder = PointDecoder(c.width, stages=c.stages, point_width=c.point_width, point_k=c.point_k,
                                    fourier=self.fourier)
        self.pool_projection = nn.Linear(3 * c.width + level_widths(c.width, c.point_width, len(c.stages))[0], c.width)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Backbone":
        """A backbone of preset ``name`` ("tiny", "small", "base") with fields overridden."""
        if name not in BACKBONE_PRESETS:
            raise ValueError(f"unknown backbone preset {name!r}; choose from {sorted(BACKBONE_PRESETS)}")
        return cls(replace(BACKBONE_PRESETS[name], **overrides))

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def _dtype(self) -> torch.dtype:
        return self.pool_projection.weight.dtype

    def group(self, data) -> Tokens:
        """The tokens of a Data / Batch without features: frame coordinates, serial order, groups."""
        pos, x, batch, num_events = _points(data)
        names = event_geometry_names(data, num_events)
        coordinates, size_units = detector_coordinates(pos, batch, names, x[:, 1:4])
        return group(coordinates, normalise_point_features(x, size_units), batch, num_events, self.config.stages)

    def embed(self, tokens: Tokens, data, visible: Optional[Tensor] = None) -> Tokens:
        """``tokens`` (from :meth:`group`) with features and the event condition of ``data``.

        With ``visible`` (T,) only those tokens' points are read (masked modelling); the others'
        features are zeros, and the result cannot be :meth:`propagate` d.
        """
        condition = self.condition_encoder(data, tokens.num_events)
        tokens = self.tokenizer(tokens, condition, visible, dtype=self._dtype)
        tokens.condition = condition
        return tokens

    def tokenize(self, data) -> Tokens:
        """:meth:`group` then :meth:`embed`: the tokens of every point, with features and condition."""
        return self.embed(self.group(data), data)

    def encode(self, tokens: Tokens, keep_mask: Optional[Tensor] = None) -> Tensor:
        """Token features (T', C) after the blocks and the final norm.

        With ``keep_mask`` (T,) only those tokens are encoded (``tokens.select(keep_mask)``, in
        that order), attending to each other only.
        """
        if tokens.condition is None or tokens.features is None:
            raise ValueError("tokens carry no features or condition: make them with Backbone.tokenize / embed")
        if keep_mask is not None:
            tokens = tokens.select(keep_mask)
        # The residual stream stays in the parameters' dtype (float32 under autocast).
        x = (tokens.features + self.position_embedding(tokens.pos)).to(self._dtype)
        x = run_token_blocks(self.blocks, x, tokens, local_k=self.config.local_k,
                             cluster_backend=self.config.cluster_backend, edge_fourier=self.fourier)
        return self.final_norm(x, tokens.condition, tokens.batch)

    def propagate(self, tokens: Tokens, token_features: Tensor) -> Tensor:
        """Per-point features (N, C) in the input order: the U-Net's up path from ``token_features``
        (those of all of ``tokens``, as :meth:`encode` without mask)."""
        return self.decoder(tokens, token_features).to(self._dtype)

    def pool(self, tokens: Tokens, token_features: Tensor) -> Tensor:
        """Event embeddings (B, C): a linear map of the mean, the max and the energy-weighted mean
        of each event's tokens (``token_features``, as :meth:`encode` without mask), and the
        energy-weighted mean of its points' down-path features (0 for an event without points)."""
        batch, num_events = tokens.batch, tokens.num_events
        point_batch = tokens.levels[0].batch
        summary = torch.cat([segment_mean(token_features, batch, num_events),
                             segment_max(token_features, batch, num_events),
                             energy_weighted_mean(token_features, tokens.energy, batch, num_events),
                             energy_weighted_mean(tokens.skips[0], tokens.point_features[:, 0].exp(), point_batch,
                                                  num_events)], 1)
        return self.pool_projection(summary.to(self._dtype))

    def forward(self, data, *, points: bool = True) -> BackboneOutput:
        """Group, embed, encode all tokens, propagate to every point (unless ``points=False``:
        event-level tasks skip the up path; ``point_features`` is then None) and pool."""
        tokens = self.tokenize(data)
        token_features = self.encode(tokens)
        return BackboneOutput(
            token_features=token_features, token_pos=tokens.pos, token_batch=tokens.batch, token_ptr=tokens.ptr,
            point_features=self.propagate(tokens, token_features) if points else None,
            pooled=self.pool(tokens, token_features), tokens=tokens,
        )


def energy_weighted_mean(values: Tensor, energy: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Rows of ``values`` (M, C) averaged per segment (``index``) with weights ``energy`` (M,) >= 0
    (0 for a segment without energy)."""
    energy = energy.to(values.dtype)
    total = energy.new_zeros(num_segments).index_add(0, index, energy)
    share = energy / total.clamp(min=torch.finfo(energy.dtype).tiny)[index]
    return values.new_zeros(num_segments, values.shape[1]).index_add(0, index, share[:, None] * values)


def token_coverage(model: "Backbone", data) -> float:
    """Share of the points of ``data`` (a Data or Batch) that belong to some token group of
    ``model`` (``model.group``): what the encoder can see of the events. 1.0 for an empty batch."""
    tokens = model.group(data)
    total = int(data.pos.shape[0])
    if total == 0:
        return 1.0
    member = torch.zeros(total, dtype=torch.bool, device=data.pos.device)
    member[tokens.group_point[(tokens.group_token >= 0) & (tokens.group_token < tokens.pos.shape[0])]] = True
    return float(member.float().mean())


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def preset_parameter_counts() -> dict[str, int]:
    """Parameters of every preset, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {name: count_parameters(Backbone(config)) for name, config in BACKBONE_PRESETS.items()}
