"""Transformer-GNN blocks over the tokens of ragged batches.

One :class:`TransformerGNNBlock` is, pre-norm with residuals,

1. local attention over the kNN graph of tokens, with a per-head bias from the edge's relative
   position (Fourier features, a linear map per block): a graph-transformer layer;
2. global attention over all tokens of the same event, with a per-head distance penalty
   ``-slope_h * |pos_i - pos_j|`` (frame units, X0 / R_M; slope kept >= 0 by a softplus);
3. an MLP.

Every norm is an :class:`AdaptiveLayerNorm`: a LayerNorm whose output is scaled and shifted per
event by a linear map of the conditioning vector. That map starts at zero, so at initialisation
the conditioning has no effect and the block is a plain pre-norm transformer block; training
learns how much energy, angles and geometry should matter.

Attention runs through :mod:`pcfm.ops.attention` (fp32 softmax inside, any input dtype), so the
blocks work under bf16 autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcfm.ops.attention import edge_attention, varlen_attention
from pcfm.ops.cluster import knn_graph


class AdaptiveLayerNorm(nn.Module):
    """``LayerNorm(x) * (1 + scale[event]) + shift[event]``, scale and shift linear in the condition.

    The linear map is zero-initialised: the module starts as a plain LayerNorm.
    """

    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, condition: Tensor, batch: Tensor) -> Tensor:
        """``x`` (T, C), ``condition`` (B, cond_dim), ``batch`` (T,) event of each row."""
        scale, shift = self.modulation(condition).chunk(2, dim=-1)  # per event, then gathered
        return self.norm(x) * (1 + scale[batch]) + shift[batch]


class LocalAttention(nn.Module):
    """Multi-head attention of each token over its kNN-graph neighbours, with an edge bias."""

    def __init__(self, width: int, heads: int, edge_dim: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.edge_bias = nn.Linear(edge_dim, heads)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, edge_index: Tensor, edge_features: Tensor) -> Tensor:
        """``x`` (T, C); ``edge_index`` (2, E) source -> destination; ``edge_features`` (E, edge_dim)."""
        q, k, v = self.qkv(x).unflatten(1, (3, self.heads, -1)).unbind(1)
        out = edge_attention(q, k, v, edge_index, edge_bias=self.edge_bias(edge_features), num_nodes=x.shape[0],
                             backend=self.backend)
        return self.out(out.flatten(1))


class GlobalAttention(nn.Module):
    """Multi-head attention over all tokens of each event, with a learned per-head distance penalty.

    Head h starts with slope ``1 / L_h`` per frame unit, ``L_h`` log-spaced over ``distance_scales``,
    so some heads look close by and others across the whole event.
    """

    def __init__(self, width: int, heads: int, distance_scales: tuple[float, float] = (0.5, 50.0),
                 backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        near, far = distance_scales
        slopes = 1.0 / torch.logspace(math.log10(near), math.log10(far), heads, dtype=torch.float64)
        self.raw_slope = nn.Parameter(torch.log(torch.expm1(slopes)).float())  # softplus^-1

    @property
    def distance_slope(self) -> Tensor:
        """(H,) non-negative slopes per frame unit."""
        return F.softplus(self.raw_slope.float())

    def forward(self, x: Tensor, pos: Tensor, ptr: Tensor) -> Tensor:
        """``x`` (T, C), ``pos`` (T, 3) frame units, ``ptr`` (B + 1,) token offsets of the events."""
        q, k, v = self.qkv(x).unflatten(1, (3, self.heads, -1)).unbind(1)
        out = varlen_attention(q, k, v, ptr, pos=pos.float(), distance_slope=self.distance_slope,
                               backend=self.backend)
        return self.out(out.flatten(1))


class TransformerGNNBlock(nn.Module):
    """Local graph attention, global event attention and an MLP, each pre-norm (AdaLN) and residual."""

    def __init__(self, width: int, heads: int, cond_dim: int, edge_dim: int, *, mlp_ratio: float = 4.0,
                 distance_scales: tuple[float, float] = (0.5, 50.0), attention_backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.local_norm = AdaptiveLayerNorm(width, cond_dim)
        self.local_attention = LocalAttention(width, heads, edge_dim, attention_backend)
        self.global_norm = AdaptiveLayerNorm(width, cond_dim)
        self.global_attention = GlobalAttention(width, heads, distance_scales, attention_backend)
        self.mlp_norm = AdaptiveLayerNorm(width, cond_dim)
        hidden = int(round(mlp_ratio * width))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, *, condition: Tensor, batch: Tensor, ptr: Tensor, pos: Tensor,
                edge_index: Tensor, edge_features: Tensor) -> Tensor:
        x = x + self.local_attention(self.local_norm(x, condition, batch), edge_index, edge_features)
        x = x + self.global_attention(self.global_norm(x, condition, batch), pos, ptr)
        return x + self.mlp(self.mlp_norm(x, condition, batch))


def run_token_blocks(blocks, x: Tensor, tokens, *, local_k: int, cluster_backend: str, edge_fourier) -> Tensor:
    """Run transformer-GNN ``blocks`` over ``tokens``: the shared loop of the encoder and of the
    masked-modelling decoder. The local graph is each token's ``local_k`` nearest tokens of its
    event (itself included); its edge features are Fourier features of the relative positions."""
    edge_index = knn_graph(tokens.pos, local_k, tokens.batch, loop=True, backend=cluster_backend)
    source, destination = edge_index
    edge_features = edge_fourier(tokens.pos[source] - tokens.pos[destination])
    for block in blocks:
        x = block(x, condition=tokens.condition, batch=tokens.batch, ptr=tokens.ptr, pos=tokens.pos,
                  edge_index=edge_index, edge_features=edge_features)
    return x
