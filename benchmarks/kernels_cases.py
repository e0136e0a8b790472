"""The inputs and rows of benchmarks/kernels.py: the sizes, the table of rows (methods), the seeded
ragged batches and kNN graph, one builder per row, and pcfm's float32 references they are checked
against.

Separate from kernels.py (the run, its plan and the command line) and from kernels_report.py so
that each reads on its own; the report reads the sizes and the method tables from here.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster_ops import BATCHES
from kernels_measure import Case, Method, Options, synchronize
from pcfm.ops import edge_attention, knn_graph, varlen_attention
from pcfm.ops.attention import edge_attention_reference, varlen_attention_reference

HEADS, HEAD_DIM = 8, 64
EDGE_NODES, EDGE_K, EDGE_CHANNELS, EDGE_HEADS = 400_000, 16, 256, 8
NODES_PER_EVENT = 4000
#: Tokens (or graph nodes) of the first events whose outputs are checked against the reference.
CHECK_TOKENS = 4096


VARLEN_METHODS = {
    "padded_sdpa": Method("padded SDPA, key-padding mask", "any"),
    "nested_sdpa": Method("nested jagged SDPA", "any", fwd_only=True),
    "flex": Method("FlexAttention, document mask (compiled)", "gpu", estimate_s=180, warm_estimate_s=20,
                   fwd_estimate_s=60),
    "torch_varlen": Method("torch varlen_attn (FA2), no bias", "cuda"),
    "pcfm_triton": Method("pcfm triton, no bias", "gpu", estimate_s=40),
    "pcfm_triton_bias": Method("pcfm triton + distance bias", "gpu", estimate_s=40),
    "pcfm_reference": Method("pcfm reference, no bias", "cpu"),
    "pcfm_reference_bias": Method("pcfm reference + distance bias", "cpu"),
}
EDGE_METHODS = {
    "pyg_eager": Method("PyG TransformerConv, eager fp32", "any", estimate_s=20),
    "pyg_compiled": Method("PyG TransformerConv, torch.compile fp32", "gpu", estimate_s=150,
                           fwd_estimate_s=90),
    "pyg_compiled_bf16": Method("PyG TransformerConv, torch.compile + bf16 autocast", "gpu", estimate_s=150,
                                fwd_estimate_s=90),
    "pcfm_layer": Method("pcfm Linear q/k/v/skip + edge_attention triton (bf16 autocast)", "gpu", estimate_s=30),
    "pcfm_kernel": Method("pcfm edge_attention triton only (bf16 q, k, v)", "gpu", estimate_s=30),
    "pcfm_reference_layer": Method("pcfm Linear q/k/v/skip + edge_attention reference (fp32)", "cpu"),
}


# ----------------------------------------------------------------------------- inputs


@dataclass
class RaggedBatch:
    """One ragged batch: q, k, v ``(N, H, D)`` leaves, offsets, positions, slopes, upstream grad."""

    name: str
    sizes: list[int]
    ptr: Tensor
    pos: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    slope: Tensor
    grad_out: Tensor

    @property
    def tokens(self) -> int:
        return sum(self.sizes)

    @property
    def fwd_flops(self) -> float:
        return 4.0 * sum(n * n for n in self.sizes) * HEADS * HEAD_DIM

    def checked_tokens(self) -> int:
        """Tokens of the first events holding at least CHECK_TOKENS tokens (one event at least)."""
        return next(int(end) for end in self.ptr[1:].tolist() if end >= min(CHECK_TOKENS, self.tokens))


def ragged_batch(name: str, options: Options) -> RaggedBatch:
    """REFERENCE.md's batch ``name``; ``options.scale`` shrinks events and points by sqrt(scale).

    At scale 1 the sizes and positions are those of benchmarks/cluster_ops.py (same seed and
    draws); q, k, v are drawn on the device.
    """
    n_events, lo, hi = BATCHES[name]
    shrink = math.sqrt(options.scale)
    n_events = max(1, round(n_events * shrink))
    lo, hi = max(1, round(lo * shrink)), max(1, round(hi * shrink))
    generator = torch.Generator().manual_seed(options.seed)
    sizes = torch.randint(lo, hi + 1, (n_events,), generator=generator)
    pos = torch.rand(int(sizes.sum()), 3, generator=generator) * 1000.0
    device, dtype = options.device, options.dtype
    values = torch.Generator(device).manual_seed(options.seed)
    shape = (int(sizes.sum()), HEADS, HEAD_DIM)
    q, k, v, grad_out = (torch.randn(shape, generator=values, device=device).to(dtype) for _ in range(4))
    slope = 0.01 * 2.0 ** -torch.arange(HEADS, dtype=torch.float32)  # per mm: 1 logit at 100 mm for head 0
    return RaggedBatch(name, sizes.tolist(), torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).to(device),
                       pos.to(device), q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                       slope.to(device).requires_grad_(), grad_out)


@dataclass
class Graph:
    """The kNN graph and the layer whose attention every edge row computes."""

    x: Tensor
    edge_index: Tensor
    grad_out: Tensor
    conv: torch.nn.Module
    events: int
    checked_nodes: int
    build_s: float

    @property
    def nodes(self) -> int:
        return self.x.shape[0]


def morton_codes(pos: Tensor, bits: int = 10) -> Tensor:
    """Z-order codes of points in their bounding box: sorting by them keeps neighbours close."""
    low, high = pos.min(0).values, pos.max(0).values
    cells = ((pos - low) / (high - low).clamp(min=1e-9) * (2**bits - 1)).long()
    code = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
    for bit in range(bits):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code


def knn_input(options: Options) -> Graph:
    """REFERENCE.md's N = 400k, k = 16 graph (times ``options.scale``) and a TransformerConv."""
    from torch_geometric.nn import TransformerConv

    device = options.device
    nodes = max(EDGE_K + 1, round(EDGE_NODES * options.scale))
    events = max(1, nodes // NODES_PER_EVENT)
    generator = torch.Generator().manual_seed(options.seed)
    pos = (torch.rand(nodes, 3, generator=generator) * 1000.0).to(device)
    event = (torch.arange(nodes) * events // nodes).to(device)  # equal, contiguous events
    order = torch.argsort(event * 2**30 + morton_codes(pos))
    pos = pos[order]
    start = time.perf_counter()
    edge_index = knn_graph(pos, EDGE_K, event, backend="torch")
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - start
    torch.manual_seed(options.seed)
    conv = TransformerConv(EDGE_CHANNELS, EDGE_CHANNELS // EDGE_HEADS, heads=EDGE_HEADS).to(device)
    values = torch.Generator(device).manual_seed(options.seed)
    x = torch.randn(nodes, EDGE_CHANNELS, generator=values, device=device)
    grad_out = torch.randn(nodes, EDGE_CHANNELS, generator=values, device=device)
    checked = int((event == 0).sum())  # the first event: closed under its kNN edges
    return Graph(x.requires_grad_(), edge_index, grad_out, conv, events, checked, build_s)


# ----------------------------------------------------------------------------- rows


def padded_sdpa_case(batch: RaggedBatch, options: Options, shared: dict) -> Case:
    events, longest = len(batch.sizes), max(batch.sizes)
    sizes = torch.tensor(batch.sizes, device=options.device)
    event = torch.repeat_interleave(torch.arange(events, device=options.device), sizes)
    slot = event * longest + torch.arange(batch.tokens, device=options.device) - batch.ptr[event]

    def padded(tensor: Tensor) -> Tensor:  # (N, H, D) -> (B, H, L, D), zeros in the padding
        buffer = tensor.new_zeros(events * longest, *tensor.shape[1:])
        buffer[slot] = tensor.detach()
        return buffer.view(events, longest, *tensor.shape[1:]).transpose(1, 2)

    def to_rows(tensor: Tensor) -> Tensor:
        return tensor.transpose(1, 2).reshape(events * longest, tensor.shape[1], tensor.shape[3])[slot]

    mask = (torch.arange(longest, device=options.device) < sizes[:, None]).view(events, 1, 1, longest)
    q, k, v = (padded(t).requires_grad_() for t in (batch.q, batch.k, batch.v))
    return Case(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), [q, k, v],
                padded(batch.grad_out), to_rows, notes={"padded_length": longest})


def nested_sdpa_case(batch: RaggedBatch, options: Options, shared: dict) -> Case:
    bounds = {"min_seqlen": min(batch.sizes), "max_seqlen": max(batch.sizes)}  # spares a host sync

    def nested(tensor: Tensor) -> Tensor:  # (N, H, D) -> (B, H, j, D)
        return torch.nested.nested_tensor_from_jagged(tensor.detach(), offsets=batch.ptr, **bounds).transpose(1, 2)

    q, k, v = nested(batch.q), nested(batch.k), nested(batch.v)
    return Case(lambda: F.scaled_dot_product_attention(q, k, v), [], None,
                lambda out: out.transpose(1, 2).contiguous().values())


def flex_case(batch: RaggedBatch, options: Options, shared: dict) -> Case:
    """Document-masked FlexAttention; every batch reuses one length, mask function and compile."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    state = shared["flex"]
    if "flex" not in state:
        document = torch.full((state["length"],), -1, dtype=torch.int32, device=options.device)

        def same_event(b, h, q_idx, kv_idx):  # padding tokens (document -1) see only themselves
            return (document[q_idx] == document[kv_idx]) & ((document[q_idx] >= 0) | (q_idx == kv_idx))

        state.update(document=document, mask_mod=same_event,
                     flex=torch.compile(flex_attention, backend=options.compile_backend, dynamic=False),
                     block_mask=torch.compile(create_block_mask, backend=options.compile_backend))
    length = state["length"]
    document = state["document"]
    document.fill_(-1)  # the block mask reads it lazily: one batch's mask is valid at a time
    document[: batch.tokens] = torch.repeat_interleave(
        torch.arange(len(batch.sizes), device=options.device, dtype=torch.int32),
        torch.tensor(batch.sizes, device=options.device))
    start = time.perf_counter()
    block_mask = state["block_mask"](state["mask_mod"], 1, 1, length, length, device=options.device)
    synchronize(options.device)
    setup_s = time.perf_counter() - start

    def flat(tensor: Tensor) -> Tensor:  # (N, H, D) -> (1, H, N', D)
        buffer = tensor.new_zeros(length, *tensor.shape[1:])
        buffer[: batch.tokens] = tensor.detach()
        return buffer.transpose(0, 1).unsqueeze(0).contiguous()

    q, k, v = (flat(t).requires_grad_() for t in (batch.q, batch.k, batch.v))
    constants = [q.detach(), k.detach(), v.detach()]  # FlexAttention on CPU refuses inputs needing grad
    flex = state["flex"]

    def attend() -> Tensor:
        return flex(*([q, k, v] if torch.is_grad_enabled() else constants), block_mask=block_mask)
    return Case(attend, [q, k, v], flat(batch.grad_out),
                lambda out: out[0].transpose(0, 1)[: batch.tokens],
                notes={"padded_length": length, "block_mask_s": round(setup_s, 2)})


def torch_varlen_case(batch: RaggedBatch, options: Options, shared: dict) -> Case:
    from torch.nn.attention.varlen import varlen_attn

    offsets, longest = batch.ptr.to(torch.int32), max(batch.sizes)
    # The seven positional arguments are common to every torch version that has it (the optional
    # ones moved between versions); the default scale is 1/sqrt(D), as for the other rows.
    return Case(lambda: varlen_attn(batch.q, batch.k, batch.v, offsets, offsets, longest, longest),
                [batch.q, batch.k, batch.v], batch.grad_out,
                notes={"signature": str(inspect.signature(varlen_attn))})


def pcfm_case(backend: str, with_bias: bool) -> Callable[[RaggedBatch, Options, dict], Case]:
    def build(batch: RaggedBatch, options: Options, shared: dict) -> Case:
        bias = {"pos": batch.pos, "distance_slope": batch.slope} if with_bias else {}
        inputs = [batch.q, batch.k, batch.v] + ([batch.slope] if with_bias else [])
        return Case(lambda: varlen_attention(batch.q, batch.k, batch.v, batch.ptr, backend=backend, **bias),
                    inputs, batch.grad_out)
    return build


VARLEN_CASES = {
    "padded_sdpa": padded_sdpa_case, "nested_sdpa": nested_sdpa_case, "flex": flex_case,
    "torch_varlen": torch_varlen_case,
    "pcfm_triton": pcfm_case("triton", False), "pcfm_triton_bias": pcfm_case("triton", True),
    "pcfm_reference": pcfm_case("reference", False), "pcfm_reference_bias": pcfm_case("reference", True),
}


def varlen_reference(batch: RaggedBatch, with_bias: bool) -> tuple[Tensor, list[Tensor]]:
    """pcfm's float32 reference output and q, k, v gradients on the checked tokens."""
    end = batch.checked_tokens()
    q, k, v = (t.detach()[:end].float().requires_grad_() for t in (batch.q, batch.k, batch.v))
    ptr = batch.ptr[batch.ptr <= end]
    bias = {"pos": batch.pos[:end], "distance_slope": batch.slope.detach()} if with_bias else {}
    out = varlen_attention_reference(q, k, v, ptr, **bias)
    return out.detach(), list(torch.autograd.grad(out, (q, k, v), batch.grad_out[:end].float()))


def pcfm_edge_layer(conv: torch.nn.Module, x: Tensor, edge_index: Tensor, backend: str) -> Tensor:
    """TransformerConv's computation with pcfm's edge attention: projections, attention, skip."""
    heads, channels = conv.heads, conv.out_channels
    q = conv.lin_query(x).view(-1, heads, channels)
    k = conv.lin_key(x).view(-1, heads, channels)
    v = conv.lin_value(x).view(-1, heads, channels)
    out = edge_attention(q, k, v, edge_index, backend=backend)
    return out.reshape(-1, heads * channels) + conv.lin_skip(x)


def autocast(options: Options, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(options.device.type, dtype=dtype)


def edge_case(method: str, graph: Graph, options: Options) -> Case:
    conv, x, edge_index = graph.conv, graph.x, graph.edge_index
    weights = [x] + list(conv.parameters())
    if method == "pcfm_kernel":
        with torch.no_grad():
            shape = (-1, EDGE_HEADS, EDGE_CHANNELS // EDGE_HEADS)
            q, k, v = (lin(x).to(options.dtype).view(shape).detach().requires_grad_()
                       for lin in (conv.lin_query, conv.lin_key, conv.lin_value))
        itemsize = q.element_size()
        floor_bytes = 4 * q.numel() * itemsize + 8 * edge_index.shape[1]
        grad = graph.grad_out.view_as(q).to(options.dtype)
        return Case(lambda: edge_attention(q, k, v, edge_index, backend="triton"), [q, k, v], grad,
                    notes={"floor_bytes": floor_bytes})
    if method in ("pcfm_layer", "pcfm_reference_layer"):
        backend = "triton" if method == "pcfm_layer" else "reference"
        half = options.dtype if method == "pcfm_layer" and options.dtype != torch.float32 else None

        def layer() -> Tensor:
            with autocast(options, half):
                return pcfm_edge_layer(conv, x, edge_index, backend)
        return Case(layer, weights, graph.grad_out, checked_inputs=1)
    if method == "pyg_eager":
        return Case(lambda: conv(x, edge_index), weights, graph.grad_out, checked_inputs=1)
    compiled = torch.compile(conv, backend=options.compile_backend)
    half = torch.bfloat16 if method == "pyg_compiled_bf16" else None

    def run() -> Tensor:
        with autocast(options, half):
            return compiled(x, edge_index)
    return Case(run, weights, graph.grad_out, checked_inputs=1)


def edge_reference(graph: Graph, method: str, case: Case) -> tuple[Tensor, list[Tensor]]:
    """Float32 reference on the checked nodes (their events are closed under the kNN edges)."""
    end = graph.checked_nodes
    keep = graph.edge_index[1] < end
    edges = graph.edge_index[:, keep]
    if method == "pcfm_kernel":
        q, k, v = (t.detach()[:end].float().requires_grad_() for t in case.inputs)
        out = edge_attention_reference(q, k, v, edges)
        grad = case.grad_output[:end].float()
        return out.detach(), list(torch.autograd.grad(out, (q, k, v), grad))
    x = graph.x.detach()[:end].clone().requires_grad_()
    out = pcfm_edge_layer(graph.conv, x, edges, "reference")
    return out.detach(), list(torch.autograd.grad(out, (x,), case.grad_output[:end].float()))
