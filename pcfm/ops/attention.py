"""Attention on ragged batches of point clouds: within events, and over graph edges.

Batches are PyG-style and never padded: the points of all events are concatenated, ``q, k, v``
are ``(N, H, D)`` tensors (points, heads, head size) and events are given by ``ptr`` offsets
(event ``b`` is rows ``ptr[b]:ptr[b + 1]``; ``ptr = torch.cat([0, batch.bincount().cumsum()])``)
or, for graphs, by an ``edge_index``.

* :func:`varlen_attention`: every point attends to all points of its own event, optionally with
  a 3D ALiBi-style bias ``-slope_h * |pos_i - pos_j|`` that makes attention geometry-aware
  without learned per-cell embeddings.
* :func:`edge_attention`: every node attends over its incoming edges (graph transformer).

Both return ``(N, H, D)`` in the input dtype and are differentiable. Backends:

* ``"reference"``: pure torch, exact (float32 maths for half inputs, float64 kept), any device.
* ``"triton"``: fused Triton kernels (``pcfm.kernels``), CUDA tensors (or CPU tensors in
  Triton's interpreter when ``TRITON_INTERPRET=1``); float16, bfloat16, float32.
* ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2, torch >=
  2.10), for bias-free varlen attention on CUDA in float16/bfloat16 only.
* ``"sdpa"``: :func:`varlen_attention` through ``torch.nn.functional.scaled_dot_product_attention``
  on padded buckets of events of similar length (the distance bias and the key padding as a float
  mask), any device and dtype; torch's fused CPU attention makes it the fast path on CPU.
* ``"auto"`` (default): on CUDA, ``torch_varlen`` where it applies, else ``triton`` when
  importable, else ``reference``; off CUDA ``sdpa`` for varlen attention and ``reference`` for
  edge attention. :func:`resolve_backend` tells which one a call would run.

Asking for a backend that cannot run raises ``ImportError`` (package missing) or
``ValueError`` (these inputs or this device), with the reason. The backends are a registry
(:data:`ATTENTION_BACKENDS`, and :data:`AUTO_ORDER` for ``"auto"``): a new one is its module
plus one line there.

Why one module of this length: the two ops, their pure-torch references, the sdpa path and the
checks that choose a backend are tested together here; the fused kernels live in :mod:`pcfm.kernels`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

OPS = ("varlen", "edge")


@dataclass(frozen=True)
class AttentionBackend:
    """An implementation of the attention ops.

    Attributes:
        ops: op ("varlen", "edge") -> ``"module:function"`` (imported when called), called as
            ``f(q, k, v, ptr, pos=, distance_slope=, scale=)`` (varlen) or
            ``f(q, k, v, edge_index, edge_bias=, scale=)`` (edge).
        problem: ``"module:function"`` ``(op, device, dtype, head_dim, has_bias)`` -> why it
            cannot run these inputs, or None; it raises ImportError when a package is missing.
            None: it runs anything.
    """

    ops: dict
    problem: Optional[str] = None


def _load(target: str) -> Callable:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)


#: Backend name -> implementation. A new backend: its module, and one line here (and in
#: :data:`AUTO_ORDER` if ``"auto"`` should pick it).
ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    "reference": AttentionBackend({"varlen": "pcfm.ops.attention:varlen_attention_reference",
                                   "edge": "pcfm.ops.attention:edge_attention_reference"}),
    "triton": AttentionBackend({"varlen": "pcfm.ops.attention:_varlen_triton",
                                "edge": "pcfm.ops.attention:_edge_triton"}, problem="pcfm.ops.attention:_triton_problem"),
    "torch_varlen": AttentionBackend({"varlen": "pcfm.ops.attention:_torch_varlen_attention"},
                                     problem="pcfm.ops.attention:_torch_varlen_problem"),
    "sdpa": AttentionBackend({"varlen": "pcfm.ops.attention:varlen_attention_sdpa"}),
}
#: What ``backend="auto"`` tries, first that runs, by device type ("other": any but CUDA).
AUTO_ORDER = {"cuda": ("torch_varlen", "triton", "reference"), "other": ("sdpa", "reference")}
#: The names ``backend`` takes (the registry as it was at import; :func:`resolve_backend` reads
#: :data:`ATTENTION_BACKENDS` itself).
BACKENDS = ("auto", *ATTENTION_BACKENDS)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Most logits (heads x queries x keys) the varlen reference holds at once: 16 MiB in float32.
_REFERENCE_BLOCK_ELEMENTS = 2**22
#: Most mask entries (events x heads x length^2) of one padded bucket of the sdpa backend: 64 MiB
#: in float32. An event larger than that alone goes through the reference (query chunks).
_SDPA_BUCKET_ELEMENTS = 2**24


# ----------------------------------------------------------------------------- public API


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ptr: Tensor,
    *,
    pos: Optional[Tensor] = None,
    distance_slope: Optional[Tensor] = None,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention of every point over the points of its own event.

    ``out_i = sum_j softmax_j(scale * q_i . k_j - distance_slope_h * |pos_i - pos_j|) v_j``
    for i, j in the same event, per head h; ``scale`` defaults to ``1 / sqrt(D)``.

    Args:
        q, k, v: ``(N, H, D)`` float16/bfloat16/float32/float64, same shape, dtype and device.
            The kernels need the last dimension contiguous and copy otherwise.
        ptr: ``(B + 1,)`` integer offsets, ``ptr[0] == 0``, ``ptr[-1] == N``, non-decreasing;
            events may be empty or hold one point.
        pos: ``(N, 3)`` physical coordinates (mm) for the distance bias; gets no gradient.
        distance_slope: ``(H,)`` per-head slope of the bias, non-negative in intended use (the
            module keeps it so, e.g. through a softplus; not checked here). Gets a gradient.
            Give both ``pos`` and ``distance_slope``, or neither.
        scale: softmax scale.
        backend: see the module docstring.

    Memory: never an ``N x N`` matrix over the batch. The reference works event by event on
    query chunks of at most ``_REFERENCE_BLOCK_ELEMENTS`` logits and recomputes each chunk in
    backward (activation checkpointing), so it keeps O(N H D) for autograd; the kernels keep
    O(N H) statistics.
    """
    _check_qkv(q, k, v, same_rows=True)
    num_points, heads, head_dim = q.shape
    ptr = _check_ptr(ptr, num_points, q.device)
    if (pos is None) != (distance_slope is None):
        raise ValueError("give both pos and distance_slope for the distance bias, or neither")
    if pos is not None:
        _check_float(pos, "pos", (num_points, 3), q.device)
        _check_float(distance_slope, "distance_slope", (heads,), q.device)
    scale = _default_scale(scale, head_dim)
    chosen = resolve_backend("varlen", device=q.device, dtype=q.dtype, head_dim=head_dim,
                             has_bias=pos is not None, backend=backend)
    run = _load(ATTENTION_BACKENDS[chosen].ops["varlen"])
    return run(q, k, v, ptr, pos=pos, distance_slope=distance_slope, scale=scale)


def edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    edge_index: Tensor,
    *,
    edge_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
    num_nodes: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention of every destination node over its incoming edges.

    PyG ``source_to_target`` convention: edge e goes from ``j = edge_index[0, e]`` to
    ``i = edge_index[1, e]``, and ``out_i = sum_e softmax_e(scale * q_i . k_j + edge_bias[e]) v_j``
    per head, the softmax running over the edges into i. A node without incoming edge gets 0.
    Duplicate edges count twice; self-loops are ordinary edges.

    Args:
        q: ``(N_dst, H, D)`` queries of the destination nodes.
        k, v: ``(N_src, H, D)`` keys and values of the source nodes (``N_src`` may differ from
            ``N_dst`` for bipartite graphs); same dtype and device as ``q``.
        edge_index: ``(2, E)`` integer tensor, sources in row 0, destinations in row 1, any order.
        edge_bias: ``(E, H)`` finite additive logit bias per edge and head (how edge features
            enter); gets a gradient.
        scale: softmax scale, default ``1 / sqrt(D)``.
        num_nodes: number of destination nodes, if the caller wants it checked against ``q``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Memory: the reference gathers ``(E, H, D)`` copies of q, k and v (like PyG); the kernels
    keep no per-edge tensor but the bias gradient ``(E, H)``.
    """
    _check_qkv(q, k, v, same_rows=False)
    num_dst, heads, head_dim = q.shape
    if num_nodes is not None and num_nodes != num_dst:
        raise ValueError(f"num_nodes={num_nodes} but q has {num_dst} rows (one per destination node)")
    edge_index = _check_edge_index(edge_index, num_src=k.shape[0], num_dst=num_dst, device=q.device)
    if edge_bias is not None:
        _check_float(edge_bias, "edge_bias", (edge_index.shape[1], heads), q.device)
    scale = _default_scale(scale, head_dim)
    chosen = resolve_backend("edge", device=q.device, dtype=q.dtype, head_dim=head_dim,
                             has_bias=edge_bias is not None, backend=backend)
    return _load(ATTENTION_BACKENDS[chosen].ops["edge"])(q, k, v, edge_index, edge_bias=edge_bias, scale=scale)


def resolve_backend(
    op: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool = False,
    backend: str = "auto",
) -> str:
    """The backend ``op`` ("varlen" or "edge") would run for inputs of this device and dtype.

    Raises ``ImportError`` or ``ValueError`` with the reason when ``backend`` names one that
    cannot run these inputs.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend != "auto" and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *ATTENTION_BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend != "auto":
        problem = _backend_problem(backend, op, device, dtype, head_dim, has_bias)  # may raise ImportError
        if problem is not None:
            raise ValueError(f"backend={backend!r} cannot run here: {problem}")
        return backend
    for name in AUTO_ORDER["cuda" if device.type == "cuda" else "other"]:
        try:
            if _backend_problem(name, op, device, dtype, head_dim, has_bias) is None:
                return name
        except ImportError:
            continue
    return "reference"


def _backend_problem(name: str, op: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                     has_bias: bool) -> Optional[str]:
    """Why backend ``name`` cannot run ``op`` on these inputs, or None."""
    spec = ATTENTION_BACKENDS[name]
    if op not in spec.ops:
        return f"it only implements {', '.join(f'{implemented}_attention' for implemented in spec.ops)}"
    return None if spec.problem is None else _load(spec.problem)(op, device, dtype, head_dim, has_bias)


# ----------------------------------------------------------------------------- references


def varlen_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ptr: Tensor,
    *,
    pos: Optional[Tensor] = None,
    distance_slope: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Pure-torch :func:`varlen_attention` (no input checks): a loop over events and query chunks.

    Each chunk is a dense softmax over its event's keys holding at most
    ``_REFERENCE_BLOCK_ELEMENTS`` logits. When autograd records, chunks are checkpointed (the
    backward recomputes them), so memory stays O(N H D) whatever the event sizes.
    """
    num_points, heads, head_dim = q.shape
    scale = _default_scale(scale, head_dim)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_c, k_c, v_c = q.to(compute), k.to(compute), v.to(compute)
    pos_c = pos.detach().to(compute) if pos is not None else None
    slope_c = distance_slope.to(compute) if distance_slope is not None else None
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, distance_slope))

    # Starting from an empty slice of q keeps an all-empty batch attached to the graph.
    pieces = [q_c[:0]]
    bounds = ptr.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        size = end - start
        if size == 0:
            continue
        chunk = max(1, _REFERENCE_BLOCK_ELEMENTS // (size * heads))
        keys, values = k_c[start:end], v_c[start:end]
        key_pos = pos_c[start:end] if pos_c is not None else None
        for first in range(start, end, chunk):
            last = min(first + chunk, end)
            query_pos = pos_c[first:last] if pos_c is not None else None
            args = (q_c[first:last], keys, values, scale, slope_c, query_pos, key_pos)
            if records:
                pieces.append(checkpoint(_dense_attention, *args, use_reentrant=False))
            else:
                pieces.append(_dense_attention(*args))
    return torch.cat(pieces).to(q.dtype)


def varlen_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ptr: Tensor,
    *,
    pos: Optional[Tensor] = None,
    distance_slope: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """:func:`varlen_attention` through ``scaled_dot_product_attention`` (no input checks).

    Events are sorted by length and cut into buckets of at most ``_SDPA_BUCKET_ELEMENTS`` mask
    entries; each bucket is padded to its longest event, with the distance bias and ``-inf`` for
    padded keys in one float mask (so padded queries, which are dropped, still see real keys).
    Sorting keeps the padding small. An event too large for one bucket runs through the reference.
    """
    num_points, heads, head_dim = q.shape
    scale = _default_scale(scale, head_dim)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(num_points, heads, head_dim, dtype=compute)
    lengths = (ptr[1:] - ptr[:-1]).tolist()
    starts = ptr[:-1].tolist()
    order = sorted((n, e) for e, n in enumerate(lengths) if n > 0)[::-1]
    slope = None if distance_slope is None else distance_slope.to(compute)
    position = None if pos is None else pos.detach().to(compute)
    pieces, rows = [], []
    i = 0
    while i < len(order):
        longest = order[i][0]
        if heads * longest * longest > _SDPA_BUCKET_ELEMENTS:  # alone too large: query chunks
            start = starts[order[i][1]]
            part = slice(start, start + longest)
            pieces.append(varlen_attention_reference(
                q[part], k[part], v[part], ptr.new_tensor([0, longest]),
                pos=None if pos is None else pos[part], distance_slope=distance_slope, scale=scale).to(compute))
            rows.append(torch.arange(start, start + longest, device=q.device))
            i += 1
            continue
        count = max(1, min(len(order) - i, _SDPA_BUCKET_ELEMENTS // (heads * longest * longest)))
        bucket = order[i:i + count]
        i += count
        size = torch.tensor([n for n, _ in bucket], device=q.device)
        first = torch.tensor([starts[e] for _, e in bucket], device=q.device)
        slot = torch.arange(longest, device=q.device)
        valid = slot[None, :] < size[:, None]  # (b, L)
        index = torch.where(valid, first[:, None] + slot[None, :], first[:, None])  # padding reads row 0
        flat = index.reshape(-1)
        dense = [t.to(compute).index_select(0, flat).view(len(bucket), longest, heads, head_dim).transpose(1, 2)
                 for t in (q, k, v)]
        mask = torch.zeros(len(bucket), 1, longest, longest, dtype=compute, device=q.device)
        if slope is not None:
            where = position.index_select(0, flat).view(len(bucket), longest, 3)
            distance = torch.cdist(where, where, compute_mode="donot_use_mm_for_euclid_dist")
            mask = -slope[None, :, None, None] * distance[:, None]
        mask = mask.masked_fill(~valid[:, None, None, :], -math.inf)
        attended = torch.nn.functional.scaled_dot_product_attention(*dense, attn_mask=mask, scale=scale)
        pieces.append(attended.transpose(1, 2)[valid])
        rows.append(index[valid])
    if not pieces:  # no point at all: an empty result still attached to the graph
        return q.clone()
    return out.index_copy(0, torch.cat(rows), torch.cat(pieces)).to(q.dtype)


def edge_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    edge_index: Tensor,
    *,
    edge_bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Pure-torch :func:`edge_attention` (no input checks): gather, segment softmax, scatter.

    The per-destination max is a ``scatter_reduce(amax)`` of detached logits (a constant shift,
    so gradients stay exact), sums use ``index_add``: no torch-scatter needed.
    """
    num_dst, heads, head_dim = q.shape
    scale = _default_scale(scale, head_dim)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    src, dst = edge_index[0].long(), edge_index[1].long()
    q_c, k_c, v_c = q.to(compute), k.to(compute), v.to(compute)

    # index_select rather than q_c[dst]: the same values, a several times faster backward on CPU
    logits = (q_c.index_select(0, dst) * k_c.index_select(0, src)).sum(-1) * scale
    if edge_bias is not None:
        logits = logits + edge_bias.to(compute)
    dst_heads = dst[:, None].expand(-1, heads)
    shift = torch.full((num_dst, heads), -math.inf, dtype=compute, device=q.device)
    shift = shift.scatter_reduce(0, dst_heads, logits.detach(), reduce="amax")
    weights = (logits - shift.index_select(0, dst)).exp()
    total = torch.zeros(num_dst, heads, dtype=compute, device=q.device).index_add(0, dst, weights)
    attention = weights / total.index_select(0, dst)
    out = torch.zeros(num_dst, heads, head_dim, dtype=compute, device=q.device)
    return out.index_add(0, dst, attention[..., None] * v_c.index_select(0, src)).to(q.dtype)


def _dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, slope: Optional[Tensor],
                     query_pos: Optional[Tensor], key_pos: Optional[Tensor]) -> Tensor:
    """Attention of queries ``(c, H, D)`` over all keys ``(n, H, D)`` of one event."""
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    if slope is not None:
        distance = (query_pos[:, None, :] - key_pos[None, :, :]).square().sum(-1).sqrt()
        logits = logits - slope[:, None, None] * distance
    return torch.einsum("hqk,khd->qhd", logits.softmax(-1), v)


# ----------------------------------------------------------------------------- torch varlen


def _torch_varlen_attention(q: Tensor, k: Tensor, v: Tensor, ptr: Tensor, *, pos: Optional[Tensor] = None,
                            distance_slope: Optional[Tensor] = None, scale: float) -> Tensor:
    """Bias-free varlen attention through ``torch.nn.attention.varlen.varlen_attn`` (``pos`` and
    ``distance_slope`` must be None: :func:`_torch_varlen_problem` refuses a bias)."""
    varlen_attn = _torch_varlen_function()
    cu_seq = ptr.to(torch.int32)
    lengths = ptr[1:] - ptr[:-1]
    max_len = int(lengths.max()) if lengths.numel() else 0
    if "scale" in inspect.signature(varlen_attn).parameters:
        return varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, scale=scale)
    # A signature without ``scale`` uses 1/sqrt(D): fold the requested scale into q.
    return varlen_attn(q * (scale * math.sqrt(q.shape[-1])), k, v, cu_seq, cu_seq, max_len, max_len)


_VARLEN_ATTN_POSITIONAL = ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k")


def _torch_varlen_function() -> Optional[Callable]:
    """``varlen_attn`` when this torch has it with the signature we call, else ``None``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    names = list(inspect.signature(varlen_attn).parameters)[: len(_VARLEN_ATTN_POSITIONAL)]
    return varlen_attn if tuple(names) == _VARLEN_ATTN_POSITIONAL else None


def _torch_varlen_problem(op: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                          has_bias: bool) -> Optional[str]:
    """Why ``torch_varlen`` cannot run these inputs, or ``None`` when it can."""
    if has_bias:
        return "it has no distance bias (pos/distance_slope); use backend='triton' or 'reference'"
    if _torch_varlen_function() is None:
        return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn "
                f"with the arguments {_VARLEN_ATTN_POSITIONAL} (it needs torch >= 2.10)")
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it needs float16 or bfloat16, got {dtype}"
    if head_dim % 8 != 0 or head_dim > 256:
        return f"FlashAttention needs a head size that is a multiple of 8 up to 256, got {head_dim}"
    return None


# ----------------------------------------------------------------------------- triton


@functools.lru_cache(maxsize=None)
def _triton_import_problem() -> Optional[str]:
    """Why triton cannot be imported, or ``None`` (cached: importing it is slow)."""
    try:
        import triton  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        return f"{type(error).__name__}: {error}"
    return None


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_input_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the (importable) triton kernels cannot run these inputs, or ``None``."""
    if dtype not in _TRITON_DTYPES:
        return f"the kernels take float16, bfloat16 or float32, got {dtype}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_interpreting():
        return None
    return (f"it needs CUDA tensors, got device {device} (for CPU tensors set TRITON_INTERPRET=1 "
            "before pcfm.kernels is first imported to use Triton's interpreter)")


def _triton_problem(op: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                    has_bias: bool) -> Optional[str]:
    """Why the triton kernels cannot run these inputs, or None; ImportError without triton."""
    missing = _triton_import_problem()
    if missing is not None:
        raise ImportError(f"backend='triton' was asked for but triton cannot be imported ({missing}); "
                          "install triton or use backend='reference'")
    return _triton_input_problem(device, dtype)


def _varlen_triton(q: Tensor, k: Tensor, v: Tensor, ptr: Tensor, *, pos: Optional[Tensor],
                   distance_slope: Optional[Tensor], scale: float) -> Tensor:
    from pcfm.kernels.varlen_attention import varlen_attention_triton

    return varlen_attention_triton(q, k, v, ptr, pos=pos, slope=distance_slope, scale=scale)


def _edge_triton(q: Tensor, k: Tensor, v: Tensor, edge_index: Tensor, *, edge_bias: Optional[Tensor],
                 scale: float) -> Tensor:
    from pcfm.kernels.edge_attention import edge_attention_triton

    return edge_attention_triton(q, k, v, edge_index, edge_bias=edge_bias, scale=scale)


# ----------------------------------------------------------------------------- checks


def _default_scale(scale: Optional[float], head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_rows: bool) -> None:
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 3:
            raise ValueError(f"{name} must be an (N, H, D) tensor, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if same_rows and q.shape != k.shape:
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same heads and head size, got {tuple(q.shape)} and {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")


def _check_float(tensor: Tensor, name: str, shape: tuple, device: torch.device) -> None:
    if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
        got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must have shape {shape}, got {got}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {tensor.device}")


def _check_ptr(ptr: Tensor, num_points: int, device: torch.device) -> Tensor:
    """``ptr`` as int64 after checking it splits the ``num_points`` rows into events."""
    if not isinstance(ptr, Tensor) or ptr.dim() != 1 or ptr.numel() == 0:
        raise ValueError("ptr must be a 1-D tensor of B + 1 event offsets")
    if ptr.dtype.is_floating_point or ptr.dtype == torch.bool or ptr.is_complex():
        raise ValueError(f"ptr must hold integers, got {ptr.dtype}")
    if ptr.device != device:
        raise ValueError(f"ptr must be on {device} like q, got {ptr.device}")
    ptr = ptr.long()
    first, last = ptr[0], ptr[-1]
    decreasing = (ptr[1:] < ptr[:-1]).any()
    if bool((first != 0) | (last != num_points) | decreasing):  # one host sync for all checks
        if first != 0:
            raise ValueError(f"ptr must start at 0, got {int(first)}")
        if last != num_points:
            raise ValueError(f"ptr must end at N = {num_points} (rows of q), got {int(last)}")
        event = int((ptr[1:] < ptr[:-1]).nonzero()[0])
        raise ValueError(f"ptr must be non-decreasing, but event {event} has negative size "
                         f"{int(ptr[event + 1] - ptr[event])}")
    return ptr


def _check_edge_index(edge_index: Tensor, *, num_src: int, num_dst: int, device: torch.device) -> Tensor:
    """``edge_index`` as int64 after checking its shape and that every index is in range."""
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        got = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"edge_index must have shape (2, E), got {got}")
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool or edge_index.is_complex():
        raise ValueError(f"edge_index must hold integers, got {edge_index.dtype}")
    if edge_index.device != device:
        raise ValueError(f"edge_index must be on {device} like q, got {edge_index.device}")
    edge_index = edge_index.long()
    if edge_index.shape[1] == 0:
        return edge_index
    src, dst = edge_index[0], edge_index[1]
    if bool((edge_index.min() < 0) | (src.max() >= num_src) | (dst.max() >= num_dst)):
        for row, name, limit in ((src, "sources (row 0)", num_src), (dst, "destinations (row 1)", num_dst)):
            bad = ((row < 0) | (row >= limit)).nonzero()
            if bad.numel():
                edge = int(bad[0])
                raise ValueError(f"edge_index {name} must lie in [0, {limit}), but edge {edge} has "
                                 f"{int(row[edge])}")
    return edge_index
