"""Fused Triton kernels for pcfm's attention ops (``pcfm.ops.attention`` is the public API).

Importing this package needs Triton, so pcfm never imports it at import time:
``pcfm.ops.attention`` loads it only when the ``"triton"`` backend runs. Without a GPU the
kernels run in Triton's CPU interpreter when ``TRITON_INTERPRET=1`` is set *before* this
package is first imported (Triton reads it when ``@triton.jit`` decorates a kernel).

This module holds what both attention kernels share: the log2(e) constant (the kernels work
with ``exp2``, which maps to one hardware instruction), the choice of matmul precision for
float32 inputs, and the ``rowwise_dot`` kernel that computes the ``Delta_i = dO_i . O_i`` term of
every attention backward pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: log2(e): softmax(x) = exp2(x * LOG2E - max), so logits are kept in base-2 units in-kernel.
LOG2E = 1.4426950408889634

#: Rows of ``rowwise_dot`` per program.
_ROWWISE_BLOCK = 64


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: torch's own rule for float32 matmuls.

    float32 inputs use exact IEEE products when ``torch.get_float32_matmul_precision()`` is
    ``"highest"`` (torch's default) and TF32 tensor cores otherwise; half-precision inputs are
    unaffected (Triton's default is passed).
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@triton.jit
def _rowwise_dot_kernel(A, B, OUT, rows, heads, head_dim, out_stride_n, out_stride_h,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[n, h] = sum_d A[n, h, d] * B[n, h, d] in float32, for row r = n * heads + h."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r < rows)[:, None] & (offs_d < head_dim)[None, :]
    offsets = offs_r[:, None] * head_dim + offs_d[None, :]
    a = tl.load(A + offsets, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offsets, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(a * b, axis=1)
    node, head = offs_r // heads, offs_r % heads
    tl.store(OUT + node * out_stride_n + head * out_stride_h, total, mask=offs_r < rows)


def rowwise_dot(a: Tensor, b: Tensor, *, heads_first: bool) -> Tensor:
    """Per-(point, head) dot products of two contiguous ``(N, H, D)`` tensors, in float32.

    Returns ``(H, N)`` when ``heads_first`` (the layout of the varlen kernels' statistics) and
    ``(N, H)`` otherwise. Never materialises a float32 copy of the inputs.
    """
    n, heads, head_dim = a.shape
    out = torch.empty((heads, n) if heads_first else (n, heads), device=a.device, dtype=torch.float32)
    rows = n * heads
    if rows == 0:
        return out
    stride_n, stride_h = (1, n) if heads_first else (heads, 1)
    grid = (triton.cdiv(rows, _ROWWISE_BLOCK),)
    _rowwise_dot_kernel[grid](a, b, out, rows, heads, head_dim, stride_n, stride_h,
                              BLOCK_R=_ROWWISE_BLOCK, BLOCK_D=triton.next_power_of_2(head_dim))
    return out
