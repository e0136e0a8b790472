"""Fused attention over the incoming edges of every node (graph transformer layer).

Math (per destination node i, per head h; j runs over the sources of i's incoming edges e)::

    logit_e = scale * q_i . k_j + edge_bias[e, h]
    out_i   = sum_e softmax_e(logit_e) v_j          (0 for a node without incoming edge)

Forward: edges are sorted once by destination (CSR; the permutation is kept so that
``edge_bias`` and its gradient are read and written in the caller's edge order). A program
owns one destination node and a block of heads, streams the node's neighbours ``block_e`` at a
time, gathers their k and v rows, and keeps an online softmax in float32; it stores the output
and the per-head log-sum-exp. The dot products are elementwise multiply-and-sum (a node has
tens of neighbours, too few for tensor cores); the op is bound by the gathers anyway.

Backward, without atomics and without any per-edge x head x dim tensor:

* destination pass (same CSR): recompute p_e from the saved log-sum-exp, then
  ``dS_e = p_e (dO_i . v_j - Delta_i)`` with ``Delta_i = dO_i . O_i``; accumulate
  ``dQ_i = scale sum_e dS_e k_j`` and write ``d edge_bias[e] = dS_e``;
* source pass over the reversed CSR (edges sorted by source): a program owns one source node
  j, recomputes p_e and dS_e for its outgoing edges from the gathered q_i, dO_i and the saved
  statistics, and accumulates ``dV_j = sum_e p_e dO_i`` and ``dK_j = scale sum_e dS_e q_i``.

Layout expectations: ``q`` ``(N_dst, H, D)``, ``k, v`` ``(N_src, H, D)`` float16, bfloat16 or
float32 (made contiguous here), ``edge_index`` ``(2, E)`` int64 with sources in row 0 and
destinations in row 1, ``edge_bias`` ``(E, H)`` any float dtype. Use the public
:func:`pcfm.ops.attention.edge_attention`, which validates its inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from pcfm.kernels import LOG2E, rowwise_dot


@dataclass(frozen=True)
class EdgeConfig:
    """Neighbours per step, heads per program (powers of two) and warps per program.

    The default keeps a gathered ``block_e x block_h x D`` tile at <= 4096 values over 8 warps
    (16 per thread; ptxas reports ~90-130 registers for sm_90 and no spills). Not autotuned.
    """

    block_e: int = 16
    block_h: Optional[int] = None  # None: as many heads as keep a gathered tile <= 4096 values
    num_warps: int = 8


def _heads_per_program(config: EdgeConfig, heads: int, padded_dim: int) -> int:
    if config.block_h is not None:
        return config.block_h
    fit = max(1, 4096 // (config.block_e * padded_dim))
    return min(triton.next_power_of_2(heads), 1 << (fit.bit_length() - 1))


def compressed_rows(row_of_edge: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """CSR of edges grouped by ``row_of_edge``: ``(rowptr (num_rows + 1,), edge order (E,))``.

    The stable sort keeps each row's edges in the caller's order, so results are deterministic.
    """
    order = torch.argsort(row_of_edge, stable=True)
    rows = torch.arange(num_rows + 1, device=row_of_edge.device, dtype=row_of_edge.dtype)
    return torch.searchsorted(row_of_edge[order], rows), order


@triton.jit
def _edge_fwd_kernel(Q, K, V, O, LSE, ROWPTR, SRC, EDGE_ID, BIAS,
                     q_stride_n, kv_stride_n, stride_h, bias_stride_e, heads, head_dim, qk_scale,
                     HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    node = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_valid = offs_h < heads
    hd_mask = h_valid[:, None] & (offs_d < head_dim)[None, :]
    hd_offsets = offs_h[:, None] * stride_h + offs_d[None, :]
    row_start = tl.load(ROWPTR + node)
    row_end = tl.load(ROWPTR + node + 1)
    # q pre-multiplied by scale * log2(e): logits come out in base-2 units.
    q = tl.load(Q + node * q_stride_n + hd_offsets, mask=hd_mask, other=0.0).to(tl.float32) * qk_scale

    row_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for edge_first in range(row_start, row_end, BLOCK_E):
        offs_e = edge_first + tl.arange(0, BLOCK_E)
        e_valid = offs_e < row_end
        src = tl.load(SRC + offs_e, mask=e_valid, other=0)
        gather_offsets = src[:, None, None] * kv_stride_n + hd_offsets[None, :, :]
        gather_mask = e_valid[:, None, None] & hd_mask[None, :, :]
        k = tl.load(K + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :, :], axis=2)
        if HAS_BIAS:
            edge_id = tl.load(EDGE_ID + offs_e, mask=e_valid, other=0)
            bias = tl.load(BIAS + edge_id[:, None] * bias_stride_e + offs_h[None, :],
                           mask=e_valid[:, None] & h_valid[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(e_valid[:, None], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=0))
        p = tl.exp2(s - new_max[None, :])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=0)
        v = tl.load(V + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v, axis=0)
        row_max = new_max

    # A node without incoming edge has row_sum == 0 and acc == 0: its output is 0.
    has_edges = row_sum > 0
    row_sum = tl.where(has_edges, row_sum, 1.0)
    out = acc / row_sum[:, None]
    tl.store(O + node * q_stride_n + hd_offsets, out.to(O.dtype.element_ty), mask=hd_mask)
    lse = tl.where(has_edges, row_max + tl.log2(row_sum), 0.0)
    tl.store(LSE + node * heads + offs_h, lse, mask=h_valid)


@triton.jit
def _edge_bwd_dst_kernel(Q, K, V, DO, LSE, DELTA, DQ, DBIAS, ROWPTR, SRC, EDGE_ID, BIAS,
                         q_stride_n, kv_stride_n, stride_h, bias_stride_e, heads, head_dim,
                         qk_scale, sm_scale,
                         HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Destination pass: dQ_i = scale sum_e dS_e k_j and d edge_bias[e] = dS_e."""
    node = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_valid = offs_h < heads
    hd_mask = h_valid[:, None] & (offs_d < head_dim)[None, :]
    hd_offsets = offs_h[:, None] * stride_h + offs_d[None, :]
    row_start = tl.load(ROWPTR + node)
    row_end = tl.load(ROWPTR + node + 1)
    q = tl.load(Q + node * q_stride_n + hd_offsets, mask=hd_mask, other=0.0).to(tl.float32) * qk_scale
    do = tl.load(DO + node * q_stride_n + hd_offsets, mask=hd_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + node * heads + offs_h, mask=h_valid, other=0.0)
    delta = tl.load(DELTA + node * heads + offs_h, mask=h_valid, other=0.0)

    dq = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for edge_first in range(row_start, row_end, BLOCK_E):
        offs_e = edge_first + tl.arange(0, BLOCK_E)
        e_valid = offs_e < row_end
        eh_mask = e_valid[:, None] & h_valid[None, :]
        src = tl.load(SRC + offs_e, mask=e_valid, other=0)
        gather_offsets = src[:, None, None] * kv_stride_n + hd_offsets[None, :, :]
        gather_mask = e_valid[:, None, None] & hd_mask[None, :, :]
        k = tl.load(K + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :, :], axis=2)
        if HAS_BIAS:
            edge_id = tl.load(EDGE_ID + offs_e, mask=e_valid, other=0)
            bias = tl.load(BIAS + edge_id[:, None] * bias_stride_e + offs_h[None, :],
                           mask=eh_mask, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        p = tl.where(e_valid[:, None], tl.exp2(s - lse[None, :]), 0.0)
        v = tl.load(V + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        dp = tl.sum(v * do[None, :, :], axis=2)
        ds = p * (dp - delta[None, :])
        dq += tl.sum(ds[:, :, None] * k, axis=0)
        if BIAS_GRAD:
            tl.store(DBIAS + edge_id[:, None] * bias_stride_e + offs_h[None, :], ds, mask=eh_mask)
    tl.store(DQ + node * q_stride_n + hd_offsets, (dq * sm_scale).to(DQ.dtype.element_ty), mask=hd_mask)


@triton.jit
def _edge_bwd_src_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, COLPTR, DST, EDGE_ID, BIAS,
                         q_stride_n, kv_stride_n, stride_h, bias_stride_e, heads, head_dim,
                         qk_scale, sm_scale,
                         HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Source pass: dV_j = sum_e p_e dO_i and dK_j = scale sum_e dS_e q_i over j's out-edges."""
    node = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_valid = offs_h < heads
    hd_mask = h_valid[:, None] & (offs_d < head_dim)[None, :]
    hd_offsets = offs_h[:, None] * stride_h + offs_d[None, :]
    col_start = tl.load(COLPTR + node)
    col_end = tl.load(COLPTR + node + 1)
    k = tl.load(K + node * kv_stride_n + hd_offsets, mask=hd_mask, other=0.0).to(tl.float32) * qk_scale
    v = tl.load(V + node * kv_stride_n + hd_offsets, mask=hd_mask, other=0.0).to(tl.float32)

    dk = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for edge_first in range(col_start, col_end, BLOCK_E):
        offs_e = edge_first + tl.arange(0, BLOCK_E)
        e_valid = offs_e < col_end
        eh_mask = e_valid[:, None] & h_valid[None, :]
        dst = tl.load(DST + offs_e, mask=e_valid, other=0)
        gather_offsets = dst[:, None, None] * q_stride_n + hd_offsets[None, :, :]
        gather_mask = e_valid[:, None, None] & hd_mask[None, :, :]
        q = tl.load(Q + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        s = tl.sum(q * k[None, :, :], axis=2)
        if HAS_BIAS:
            edge_id = tl.load(EDGE_ID + offs_e, mask=e_valid, other=0)
            bias = tl.load(BIAS + edge_id[:, None] * bias_stride_e + offs_h[None, :],
                           mask=eh_mask, other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        stat_offsets = dst[:, None] * heads + offs_h[None, :]
        lse = tl.load(LSE + stat_offsets, mask=eh_mask, other=0.0)
        delta = tl.load(DELTA + stat_offsets, mask=eh_mask, other=0.0)
        p = tl.where(e_valid[:, None], tl.exp2(s - lse), 0.0)
        do = tl.load(DO + gather_offsets, mask=gather_mask, other=0.0).to(tl.float32)
        dp = tl.sum(do * v[None, :, :], axis=2)
        ds = p * (dp - delta)
        dv += tl.sum(p[:, :, None] * do, axis=0)
        dk += tl.sum(ds[:, :, None] * q, axis=0)
    tl.store(DK + node * kv_stride_n + hd_offsets, (dk * sm_scale).to(DK.dtype.element_ty), mask=hd_mask)
    tl.store(DV + node * kv_stride_n + hd_offsets, dv.to(DV.dtype.element_ty), mask=hd_mask)


class _EdgeAttention(torch.autograd.Function):
    """Autograd wrapper: gradients for q, k, v and edge_bias."""

    @staticmethod
    def forward(ctx, q, k, v, edge_index, edge_bias, scale, config):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        num_dst, heads, head_dim = q.shape
        src, dst = edge_index[0], edge_index[1]
        rowptr, by_dst = compressed_rows(dst, num_dst)
        src_by_dst = src[by_dst].contiguous()
        has_bias = edge_bias is not None
        bias = edge_bias.contiguous() if has_bias else q
        block_d = triton.next_power_of_2(head_dim)
        block_h = _heads_per_program(config, heads, block_d)
        out = torch.empty_like(q)
        lse = torch.empty((num_dst, heads), device=q.device, dtype=torch.float32)
        if num_dst > 0:
            _edge_fwd_kernel[(num_dst, triton.cdiv(heads, block_h))](
                q, k, v, out, lse, rowptr, src_by_dst, by_dst, bias,
                q.stride(0), k.stride(0), q.stride(1), heads if has_bias else 0,
                heads, head_dim, scale * LOG2E,
                HAS_BIAS=has_bias, BLOCK_E=config.block_e, BLOCK_H=block_h, BLOCK_D=block_d,
                num_warps=config.num_warps)
        ctx.save_for_backward(q, k, v, out, lse, edge_index, rowptr, by_dst, src_by_dst, bias)
        ctx.has_bias, ctx.scale, ctx.config, ctx.block_h = has_bias, scale, config, block_h
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, edge_index, rowptr, by_dst, src_by_dst, bias = ctx.saved_tensors
        has_bias, scale, config, block_h = ctx.has_bias, ctx.scale, ctx.config, ctx.block_h
        num_dst, heads, head_dim = q.shape
        num_src = k.shape[0]
        grad_out = grad_out.contiguous()
        bias_grad = has_bias and ctx.needs_input_grad[4]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.empty(bias.shape, device=q.device, dtype=torch.float32) if bias_grad else q
        common = (q.stride(0), k.stride(0), q.stride(1), heads if has_bias else 0,
                  heads, head_dim, scale * LOG2E, scale)
        meta = dict(HAS_BIAS=has_bias, BLOCK_E=config.block_e, BLOCK_H=block_h,
                    BLOCK_D=triton.next_power_of_2(head_dim), num_warps=config.num_warps)
        head_blocks = triton.cdiv(heads, block_h)

        delta = rowwise_dot(out, grad_out, heads_first=False)
        if num_dst > 0:
            _edge_bwd_dst_kernel[(num_dst, head_blocks)](
                q, k, v, grad_out, lse, delta, dq, dbias, rowptr, src_by_dst, by_dst, bias,
                *common, BIAS_GRAD=bias_grad, **meta)
        colptr, by_src = compressed_rows(edge_index[0], num_src)
        dst_by_src = edge_index[1][by_src].contiguous()
        if num_src > 0:
            _edge_bwd_src_kernel[(num_src, head_blocks)](
                q, k, v, grad_out, lse, delta, dk, dv, colptr, dst_by_src, by_src, bias,
                *common, **meta)
        return dq, dk, dv, None, dbias.to(bias.dtype) if bias_grad else None, None, None


def edge_attention_triton(q: Tensor, k: Tensor, v: Tensor, edge_index: Tensor, *,
                          edge_bias: Optional[Tensor] = None, scale: Optional[float] = None,
                          config: Optional[EdgeConfig] = None) -> Tensor:
    """Fused edge attention (see the module docstring); inputs are not validated here."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _EdgeAttention.apply(q, k, v, edge_index.to(torch.int64), edge_bias, float(scale),
                                config or EdgeConfig())
