"""The geometry-agnostic backbone shared by every pretraining and fine-tuning task.

``Backbone(data)`` runs, on a ragged PyG batch of point clouds (:mod:`pcfm.data.pointcloud`):

1. :meth:`Backbone.tokenize`: FPS centres + kNN groups + mini-PointNet
   (:class:`~pcfm.nn.tokenizer.PointNetTokenizer`), and the event conditioning vector;
2. :meth:`Backbone.encode`: a position embedding of each token centre relative to its event's
   centroid (the plain mean of the token centres: absolute detector coordinates mean nothing
   across geometries, and a mean of centres does not depend on how densely a region is
   sampled by cells), then ``depth`` transformer-GNN blocks and a final adaptive norm;
3. :meth:`Backbone.propagate`: per-point features, inverse-distance-weighted from the 3
   nearest tokens of the same event (PointNet++ feature propagation, weights
   ``1 / (d^2 + IDW_EPS_MM2)``) plus a skip MLP of each point's own features and position;
4. :meth:`Backbone.pool`: one embedding per event, ``Linear([mean, max] of its tokens)``.

Masked modelling calls the steps itself: tokenise once, ``encode(tokens, keep_mask)`` on the
visible tokens only, and read the hidden groups' points from ``tokens.group_point``.

Sizes come as presets (:data:`BACKBONE_PRESETS`: tiny for CPU tests and the quickstart, small
and base for GPU training) and the whole configuration round-trips through a plain dict
(:meth:`BackboneConfig.to_dict`), which checkpoints store.

Host synchronisations: kNN and FPS (:mod:`pcfm.ops.cluster`) and the input checks of the
attention ops read sizes on the host, so a compiled graph breaks there; the rest (MLPs,
norms, attention maths) has no ``.item()`` and compiles.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from pcfm.nn.blocks import AdaptiveLayerNorm, TransformerGNNBlock, run_token_blocks
from pcfm.nn.encoding import (MAX_WAVELENGTH_MM, MIN_WAVELENGTH_MM, ConditionEncoder, FourierFeatures, FourierMLP,
                              normalise_point_features)
from pcfm.nn.tokenizer import PointNetTokenizer, Tokens, segment_max, segment_mean
from pcfm.ops import knn

#: Geometries with their own tag embedding by default (others use the "unknown" slot).
DEFAULT_GEOMETRY_VOCABULARY = ("calochallenge-ds1-photons", "calochallenge-ds1-pions", "calochallenge-ds2",
                               "calochallenge-ds3", "par04-scipb", "lartpc-768")
#: Tokens a point's features are interpolated from.
INTERPOLATION_NEIGHBOURS = 3
#: Regulariser of the inverse squared distance weights, mm^2: a point on a token centre takes
#: (almost) only that token's features.
IDW_EPS_MM2 = 1e-4


@dataclass(frozen=True)
class BackboneConfig:
    """Every size and choice of a :class:`Backbone`; see :data:`BACKBONE_PRESETS`.

    Attributes:
        width: token channels C. depth: transformer-GNN blocks. heads: attention heads.
        mlp_ratio: hidden width of the block MLPs, times C.
        cond_dim: width of the event conditioning vector.
        in_features: columns of ``data.x`` (:data:`pcfm.data.pointcloud.POINT_FEATURES`).
        num_tokens / token_ratio: centres per event, exactly one given: a fixed number
            (``min(num_tokens, n)``) or ``ceil(token_ratio * n)``.
        group_size: points per group (the kNN of each centre).
        group_hidden: hidden channels of the PointNet.
        local_k: neighbours of each token in the local-attention graph (itself included).
        num_frequencies: Fourier frequencies per coordinate, wavelengths log-spaced from
            ``min_wavelength_mm`` to ``max_wavelength_mm``.
        distance_scales_mm: global-attention heads start with distance penalties 1/L per mm,
            L log-spaced over this range.
        geometry_vocabulary: geometry names with a learned tag embedding (an empty tuple turns
            tags off); any other name gets the "unknown" slot.
        attention_backend: ``backend`` for :mod:`pcfm.ops.attention` ("auto", "reference", ...).
        cluster_backend: ``backend`` for kNN / FPS in :mod:`pcfm.ops.cluster`.
    """

    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    cond_dim: int = 64
    in_features: int = 4
    num_tokens: Optional[int] = 64
    token_ratio: Optional[float] = None
    group_size: int = 16
    group_hidden: int = 64
    local_k: int = 8
    num_frequencies: int = 12
    min_wavelength_mm: float = MIN_WAVELENGTH_MM
    max_wavelength_mm: float = MAX_WAVELENGTH_MM
    distance_scales_mm: tuple[float, float] = (10.0, 10_000.0)
    geometry_vocabulary: tuple[str, ...] = DEFAULT_GEOMETRY_VOCABULARY
    attention_backend: str = "auto"
    cluster_backend: str = "auto"

    def __post_init__(self):
        if (self.num_tokens is None) == (self.token_ratio is None):
            raise ValueError("give exactly one of num_tokens and token_ratio (set the other to None)")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        # Lists (from a dict / JSON / YAML) become tuples so that configs compare and hash.
        object.__setattr__(self, "distance_scales_mm", tuple(float(v) for v in self.distance_scales_mm))
        object.__setattr__(self, "geometry_vocabulary", tuple(self.geometry_vocabulary))

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for checkpoints, JSON and YAML."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BackboneConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error (a typo would go unnoticed)."""
        unknown = set(values) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"unknown BackboneConfig field(s): {sorted(unknown)}")
        return cls(**values)


#: Sizes by name. Parameter counts (default vocabulary) are checked by the tests:
#: tiny 0.36M (CPU), small 9.3M, base 30.8M (GPU).
BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    "tiny": BackboneConfig(width=64, depth=4, heads=4, mlp_ratio=2.0, cond_dim=64, num_tokens=64, group_size=16,
                           group_hidden=64, local_k=8),
    "small": BackboneConfig(width=256, depth=6, heads=8, mlp_ratio=4.0, cond_dim=256, num_tokens=256, group_size=32,
                            group_hidden=128, local_k=16),
    "base": BackboneConfig(width=384, depth=10, heads=6, mlp_ratio=4.0, cond_dim=256, num_tokens=512, group_size=32,
                           group_hidden=256, local_k=16),
}


class BackboneOutput(NamedTuple):
    """What :meth:`Backbone.forward` returns for a batch of B events, N points, T tokens."""

    token_features: Tensor  # (T, C)
    token_pos: Tensor  # (T, 3) mm
    token_batch: Tensor  # (T,)
    token_ptr: Tensor  # (B + 1,)
    point_features: Tensor  # (N, C), in the input point order
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
    """Tokeniser + transformer-GNN encoder + per-point and per-event read-outs (module docstring)."""

    def __init__(self, config: Optional[BackboneConfig] = None):
        super().__init__()
        config = config or BackboneConfig()
        self.config = config
        c = config
        wavelengths = dict(min_wavelength=c.min_wavelength_mm, max_wavelength=c.max_wavelength_mm)
        self.condition_encoder = ConditionEncoder(c.cond_dim, c.geometry_vocabulary)
        self.tokenizer = PointNetTokenizer(
            c.width, c.group_hidden, in_features=c.in_features, group_size=c.group_size, num_tokens=c.num_tokens,
            token_ratio=c.token_ratio, num_frequencies=c.num_frequencies, cluster_backend=c.cluster_backend,
            **wavelengths)
        self.position_embedding = FourierMLP(c.width, c.num_frequencies, **wavelengths)
        self.edge_fourier = FourierFeatures(c.num_frequencies, **wavelengths)
        self.blocks = nn.ModuleList(
            TransformerGNNBlock(c.width, c.heads, c.cond_dim, self.edge_fourier.out_dim, mlp_ratio=c.mlp_ratio,
                                distance_scales_mm=c.distance_scales_mm, attention_backend=c.attention_backend)
            for _ in range(c.depth))
        self.final_norm = AdaptiveLayerNorm(c.width, c.cond_dim)
        self.point_fourier = FourierFeatures(c.num_frequencies, **wavelengths)
        self.point_skip = nn.Sequential(nn.Linear(self.point_fourier.out_dim + c.in_features, c.width), nn.GELU(),
                                        nn.Linear(c.width, c.width))
        self.pool_projection = nn.Linear(2 * c.width, c.width)

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

    def tokenize(self, data, *, random_start: bool = False, generator: Optional[torch.Generator] = None) -> Tokens:
        """Tokens of a Data / Batch, with the event conditioning vector set.

        ``random_start`` starts each event's FPS at a random point drawn from ``generator``
        (data augmentation); by default tokens depend only on the set of points.
        """
        pos, x, batch, num_events = _points(data)
        tokens = self.tokenizer(pos.to(self._dtype), x.to(self._dtype), batch, num_events, random_start=random_start,
                                generator=generator)
        tokens.condition = self.condition_encoder(data, num_events)
        return tokens

    def encode(self, tokens: Tokens, keep_mask: Optional[Tensor] = None) -> Tensor:
        """Token features (T', C) after the blocks and the final norm.

        With ``keep_mask`` (T,) only those tokens are encoded (``tokens.select(keep_mask)``, in
        that order), attending to each other only; positions stay relative to the centroid of
        all tokens.
        """
        if tokens.condition is None:
            raise ValueError("tokens carry no condition: make them with Backbone.tokenize")
        if keep_mask is not None:
            tokens = tokens.select(keep_mask)
        relative = tokens.pos - tokens.centroid[tokens.batch]
        # The residual stream stays in the parameters' dtype (float32 under autocast).
        x = (tokens.features + self.position_embedding(relative)).to(self._dtype)
        x = run_token_blocks(self.blocks, x, tokens, local_k=self.config.local_k,
                             cluster_backend=self.config.cluster_backend, edge_fourier=self.edge_fourier)
        return self.final_norm(x, tokens.condition, tokens.batch)

    def propagate(self, data, tokens: Tokens, token_features: Tensor) -> Tensor:
        """Per-point features (N, C): IDW interpolation of the 3 nearest tokens + a skip of the point.

        ``token_features`` are those of all of ``tokens`` (as :meth:`encode` without mask).
        The skip sees the point's normalised features and its position relative to the event
        centroid (Fourier features), so points sharing tokens still differ.
        """
        pos, x, batch, _ = _points(data)
        pos = pos.to(tokens.pos.dtype)
        point, token = knn(tokens.pos, pos, INTERPOLATION_NEIGHBOURS, tokens.batch, batch,
                           backend=self.config.cluster_backend)
        weight = 1.0 / ((pos[point] - tokens.pos[token]).square().sum(1) + IDW_EPS_MM2)
        weight = weight / torch.zeros_like(pos[:, 0]).index_add(0, point, weight)[point]
        contributions = weight[:, None].to(token_features.dtype) * token_features[token]
        interpolated = contributions.new_zeros(pos.shape[0], token_features.shape[1]).index_add(0, point, contributions)
        own = torch.cat([self.point_fourier(pos - tokens.centroid[batch]).to(pos.dtype),
                         normalise_point_features(x.to(pos.dtype))], 1)
        return interpolated + self.point_skip(own)

    def pool(self, token_features: Tensor, token_batch: Tensor, num_events: int) -> Tensor:
        """Event embeddings (B, C): a linear map of the mean and max of each event's tokens (0 if none)."""
        summary = torch.cat([segment_mean(token_features, token_batch, num_events),
                             segment_max(token_features, token_batch, num_events)], 1)
        return self.pool_projection(summary)

    def forward(self, data, *, random_start: bool = False, generator: Optional[torch.Generator] = None
                ) -> BackboneOutput:
        """Tokenise, encode all tokens, propagate to every point and pool (see the module docstring)."""
        tokens = self.tokenize(data, random_start=random_start, generator=generator)
        token_features = self.encode(tokens)
        return BackboneOutput(
            token_features=token_features, token_pos=tokens.pos, token_batch=tokens.batch, token_ptr=tokens.ptr,
            point_features=self.propagate(data, tokens, token_features),
            pooled=self.pool(token_features, tokens.batch, tokens.num_events), tokens=tokens,
        )


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def preset_parameter_counts() -> dict[str, int]:
    """Parameters of every preset, built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        return {name: count_parameters(Backbone(config)) for name, config in BACKBONE_PRESETS.items()}
