"""Fused attention within the events of a ragged batch, with an optional 3D distance bias.

Math (per event, per head h; i, j points of the same event)::

    logit_ij = scale * q_i . k_j  -  slope_h * |pos_i - pos_j|        (bias only with pos/slope)
    out_i    = sum_j softmax_j(logit_ij) v_j

The kernels follow FlashAttention-2: a program owns a tile of ``block_m`` queries of one event
and one head, streams that event's keys in tiles of ``block_n``, and keeps a running max and
sum (online softmax, float32) so that no ``n x n`` matrix is ever stored; the distance bias is
recomputed per tile from the positions. The forward pass saves the log-sum-exp of every row;
the backward pass recomputes the probabilities from it: one kernel per key tile accumulates
dK, dV and the slope gradient over the event's queries, a second per query tile accumulates dQ.
No atomics: each program writes its own rows and its own partial slope-gradient sum.

Programs are laid out by a *tile table* built on the device from ``ptr`` without a host sync:
one row ``[first point, event start, event end]`` per tile, padded to the static bound
``N // block + events`` with empty tiles, and sorted longest event first so the heaviest
programs start early.

Memory: besides its output, the forward keeps only the ``(H, N)`` float32 log-sum-exp for the
backward, which allocates dQ, dK, dV, an ``(H, N)`` Delta and one float per key-tile program.

Layout expectations: ``q, k, v`` are ``(N, H, D)`` float16, bfloat16 or float32 on one device
(made contiguous here), ``ptr`` ``(B + 1,)`` int64 offsets, ``pos`` ``(N, 3)`` and ``slope``
``(H,)`` in any float dtype (used in float32). Use the public
:func:`pcfm.ops.attention.varlen_attention`, which validates its inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pcfm.kernels import LOG2E, dot_precision, rowwise_dot


@dataclass(frozen=True)
class VarlenConfig:
    """Tile sizes (powers of two, at least 16 for ``tl.dot``) and launch parameters."""

    block_m: int            # forward: queries per program
    block_n: int            # forward: keys per step
    dkdv_block_m: int       # dK/dV: queries per step
    dkdv_block_n: int       # dK/dV: keys per program
    dq_block_m: int         # dQ: queries per program
    dq_block_n: int         # dQ: keys per step
    num_warps: int = 4
    bwd_num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, dtype: torch.dtype) -> VarlenConfig:
    """Tiles for an H100, chosen so that ptxas reports no register spills for sm_90.

    Not autotuned: tune on the target GPU (benchmarks) and pass a config to
    :func:`varlen_attention_triton`.
    """
    if dtype == torch.float32:
        if head_dim <= 64:
            return VarlenConfig(64, 32, 32, 32, 32, 32, num_warps=8, bwd_num_warps=8)
        return VarlenConfig(64, 16, 32, 16, 32, 16, num_warps=8, bwd_num_warps=8)
    if head_dim <= 64:
        return VarlenConfig(128, 64, 32, 128, 128, 32, num_warps=8, bwd_num_warps=8, num_stages=3)
    return VarlenConfig(64, 32, 16, 64, 64, 16, num_warps=8, bwd_num_warps=8)


def tile_table(ptr: Tensor, block: int, num_points: int) -> Tensor:
    """``(tiles, 3)`` int64 rows ``[first point, event start, event end]``, longest event first.

    Event ``b`` owns ``ceil(n_b / block)`` tiles. Their total never exceeds
    ``num_points // block + B``, so the table has that static size (no host sync) and the
    surplus rows are ``[0, 0, 0]``: empty tiles whose programs do nothing.
    """
    num_events = ptr.numel() - 1
    lengths = ptr[1:] - ptr[:-1]
    tiles_per_event = (lengths + block - 1) // block
    tiles_before_next = tiles_per_event.cumsum(0)
    capacity = num_points // block + num_events
    tile = torch.arange(capacity, device=ptr.device)
    event = torch.searchsorted(tiles_before_next, tile, right=True)
    real = event < num_events
    event = event.clamp(max=num_events - 1)
    first_tile = tiles_before_next[event] - tiles_per_event[event]
    first_point = ptr[event] + (tile - first_tile) * block
    table = torch.stack([first_point, ptr[event], ptr[event + 1]], dim=1)
    table = torch.where(real[:, None], table, torch.zeros_like(table))
    order = torch.argsort(torch.where(real, lengths[event], -1), descending=True, stable=True)
    return table[order].contiguous()


@triton.jit
def _distance(x, y, z, POS, offs, valid):
    """|pos[offs] - (x, y, z)| as a (len(x), len(offs)) tile; pos is (N, 3) float32."""
    px = tl.load(POS + offs * 3, mask=valid, other=0.0)
    py = tl.load(POS + offs * 3 + 1, mask=valid, other=0.0)
    pz = tl.load(POS + offs * 3 + 2, mask=valid, other=0.0)
    dx = x[:, None] - px[None, :]
    dy = y[:, None] - py[None, :]
    dz = z[:, None] - pz[None, :]
    return tl.sqrt(dx * dx + dy * dy + dz * dz)


@triton.jit
def _varlen_fwd_kernel(Q, K, V, O, LSE, TILES, POS, SLOPE,
                       stride_n, stride_h, num_points, heads, head_dim, qk_scale,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    q_first = tl.load(TILES + tile * 3)
    event_start = tl.load(TILES + tile * 3 + 1)
    event_end = tl.load(TILES + tile * 3 + 2)

    # 64-bit scalar bases plus 32-bit offsets within a tile keep the address tensors small.
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = rows < event_end - q_first
    q_offsets = rows[:, None] * stride_n + offs_d[None, :]
    kv_offsets = cols[:, None] * stride_n + offs_d[None, :]
    head_offset = head * stride_h
    q = tl.load(Q + q_first * stride_n + head_offset + q_offsets,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    if HAS_BIAS:
        qx = tl.load(POS + (q_first + rows) * 3, mask=m_valid, other=0.0)
        qy = tl.load(POS + (q_first + rows) * 3 + 1, mask=m_valid, other=0.0)
        qz = tl.load(POS + (q_first + rows) * 3 + 2, mask=m_valid, other=0.0)
        slope = tl.load(SLOPE + head) * 1.4426950408889634

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_first in range(event_start, event_end, BLOCK_N):
        n_valid = cols < event_end - key_first
        kv_mask = n_valid[:, None] & d_valid[None, :]
        kv_base = key_first * stride_n + head_offset
        k = tl.load(K + kv_base + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s -= slope * _distance(qx, qy, qz, POS + key_first * 3, cols, n_valid)
        s = tl.where(n_valid[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        p = tl.exp2(s - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = tl.load(V + kv_base + kv_offsets, mask=kv_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    # Rows past the event end (and the empty padding tiles) have row_sum == 0 and are not stored.
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    out = acc / row_sum[:, None]
    tl.store(O + q_first * stride_n + head_offset + q_offsets, out.to(O.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + head * num_points + q_first + rows, row_max + tl.log2(row_sum), mask=m_valid)


@triton.jit
def _varlen_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SLOPE_PARTIAL, TILES, POS, SLOPE,
                            stride_n, stride_h, num_points, heads, head_dim, qk_scale, sm_scale,
                            HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile: dV = P^T dO, dK = scale dS^T Q, and its share of d slope = -sum dS * dist."""
    tile = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    k_first = tl.load(TILES + tile * 3)
    event_start = tl.load(TILES + tile * 3 + 1)
    event_end = tl.load(TILES + tile * 3 + 2)

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    n_valid = cols < event_end - k_first
    head_offset = head * stride_h
    q_offsets = rows[:, None] * stride_n + offs_d[None, :]
    kv_offsets = cols[:, None] * stride_n + offs_d[None, :]
    kv_base = k_first * stride_n + head_offset
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + kv_base + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_base + kv_offsets, mask=kv_mask, other=0.0)
    if HAS_BIAS:
        kx = tl.load(POS + (k_first + cols) * 3, mask=n_valid, other=0.0)
        ky = tl.load(POS + (k_first + cols) * 3 + 1, mask=n_valid, other=0.0)
        kz = tl.load(POS + (k_first + cols) * 3 + 2, mask=n_valid, other=0.0)
        slope = tl.load(SLOPE + head) * 1.4426950408889634

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    ds_dist = tl.zeros([BLOCK_N], tl.float32)
    for query_first in range(event_start, event_end, BLOCK_M):
        m_valid = rows < event_end - query_first
        q_base = query_first * stride_n + head_offset
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + q_base + q_offsets, mask=q_mask, other=0.0)
        do = tl.load(DO + q_base + q_offsets, mask=q_mask, other=0.0)
        stats = head * num_points + query_first + rows
        lse = tl.load(LSE + stats, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + stats, mask=m_valid, other=0.0)
        # Transposed scores (keys x queries) so that every product below is a plain tl.dot.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            dist_t = _distance(kx, ky, kz, POS + query_first * 3, rows, m_valid)
            s_t -= slope * dist_t
        p_t = tl.exp2(s_t - lse[None, :])
        p_t = tl.where(m_valid[None, :] & n_valid[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            ds_dist += tl.sum(ds_t * dist_t, axis=1)

    tl.store(DK + kv_base + kv_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_base + kv_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if HAS_BIAS:
        tl.store(SLOPE_PARTIAL + tl.program_id(0), -tl.sum(ds_dist, axis=0))


@triton.jit
def _varlen_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TILES, POS, SLOPE,
                          stride_n, stride_h, num_points, heads, head_dim, qk_scale, sm_scale,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query tile: dQ = scale dS K with dS = P * (dO V^T - Delta)."""
    tile = tl.program_id(0) // heads
    head = tl.program_id(0) % heads
    q_first = tl.load(TILES + tile * 3)
    event_start = tl.load(TILES + tile * 3 + 1)
    event_end = tl.load(TILES + tile * 3 + 2)

    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    m_valid = rows < event_end - q_first
    head_offset = head * stride_h
    q_offsets = rows[:, None] * stride_n + offs_d[None, :]
    kv_offsets = cols[:, None] * stride_n + offs_d[None, :]
    q_base = q_first * stride_n + head_offset
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + q_base + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(DO + q_base + q_offsets, mask=q_mask, other=0.0)
    stats = head * num_points + q_first + rows
    lse = tl.load(LSE + stats, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + stats, mask=m_valid, other=0.0)
    if HAS_BIAS:
        qx = tl.load(POS + (q_first + rows) * 3, mask=m_valid, other=0.0)
        qy = tl.load(POS + (q_first + rows) * 3 + 1, mask=m_valid, other=0.0)
        qz = tl.load(POS + (q_first + rows) * 3 + 2, mask=m_valid, other=0.0)
        slope = tl.load(SLOPE + head) * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_first in range(event_start, event_end, BLOCK_N):
        n_valid = cols < event_end - key_first
        kv_base = key_first * stride_n + head_offset
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(K + kv_base + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_base + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s -= slope * _distance(qx, qy, qz, POS + key_first * 3, cols, n_valid)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + q_base + q_offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _padded_head_dim(head_dim: int) -> int:
    """Head size rounded up to a power of two, at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(head_dim))


class _VarlenAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward kernels; gradients for q, k, v and the slope."""

    @staticmethod
    def forward(ctx, q, k, v, ptr, pos, slope, scale, config):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        num_points, heads, head_dim = q.shape
        has_bias = slope is not None
        # pos gets no gradient: the bias is a fixed function of the geometry.
        pos32 = pos.detach().to(torch.float32).contiguous() if has_bias else q
        slope32 = slope.detach().to(torch.float32).contiguous() if has_bias else q
        out = torch.empty_like(q)
        lse = torch.empty((heads, num_points), device=q.device, dtype=torch.float32)
        if num_points > 0:
            tiles = tile_table(ptr, config.block_m, num_points)
            _varlen_fwd_kernel[(tiles.shape[0] * heads,)](
                q, k, v, out, lse, tiles, pos32, slope32,
                q.stride(0), q.stride(1), num_points, heads, head_dim, scale * LOG2E,
                HAS_BIAS=has_bias, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                BLOCK_D=_padded_head_dim(head_dim), DOT_PRECISION=dot_precision(q.dtype),
                num_warps=config.num_warps, num_stages=config.num_stages)
        ctx.save_for_backward(q, k, v, out, lse, ptr, pos32, slope32)
        ctx.has_bias, ctx.scale, ctx.config = has_bias, scale, config
        ctx.slope_dtype = slope.dtype if has_bias else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, ptr, pos32, slope32 = ctx.saved_tensors
        config, scale, has_bias = ctx.config, ctx.scale, ctx.has_bias
        num_points, heads, head_dim = q.shape
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dslope = None
        if num_points == 0:
            if has_bias:
                dslope = torch.zeros(heads, device=q.device, dtype=ctx.slope_dtype)
            return dq, dk, dv, None, None, dslope, None, None

        delta = rowwise_dot(out, grad_out, heads_first=True)
        common = dict(HAS_BIAS=has_bias, BLOCK_D=_padded_head_dim(head_dim),
                      DOT_PRECISION=dot_precision(q.dtype), num_warps=config.bwd_num_warps,
                      num_stages=config.num_stages)
        strides = (q.stride(0), q.stride(1), num_points, heads, head_dim, scale * LOG2E, scale)

        key_tiles = tile_table(ptr, config.dkdv_block_n, num_points)
        grid = (key_tiles.shape[0] * heads,)
        slope_partial = torch.empty(grid[0] if has_bias else 1, device=q.device, dtype=torch.float32)
        _varlen_bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, dk, dv, slope_partial,
                                      key_tiles, pos32, slope32, *strides,
                                      BLOCK_M=config.dkdv_block_m, BLOCK_N=config.dkdv_block_n, **common)
        query_tiles = tile_table(ptr, config.dq_block_m, num_points)
        _varlen_bwd_dq_kernel[(query_tiles.shape[0] * heads,)](
            q, k, v, grad_out, lse, delta, dq, query_tiles, pos32, slope32, *strides,
            BLOCK_M=config.dq_block_m, BLOCK_N=config.dq_block_n, **common)
        if has_bias:
            # Program p handled head p % heads: fold the partial sums per head.
            dslope = slope_partial.view(-1, heads).sum(0).to(ctx.slope_dtype)
        return dq, dk, dv, None, None, dslope, None, None


def varlen_attention_triton(q: Tensor, k: Tensor, v: Tensor, ptr: Tensor, *,
                            pos: Optional[Tensor] = None, slope: Optional[Tensor] = None,
                            scale: Optional[float] = None,
                            config: Optional[VarlenConfig] = None) -> Tensor:
    """Fused varlen attention (see the module docstring); inputs are not validated here."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if config is None:
        config = default_config(q.shape[-1], q.dtype)
    return _VarlenAttention.apply(q, k, v, ptr.to(torch.int64).contiguous(), pos, slope,
                                  float(scale), config)
