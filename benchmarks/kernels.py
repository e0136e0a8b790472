"""pcfm's fused attention kernels against the alternatives, on shared/REFERENCE.md section 3's inputs.

Varlen attention (every point attends to the points of its own event), 8 heads x 64, bf16, on
the seeded ragged batches of benchmarks/cluster_ops.py: "showers" (256 events of 100-1500
points) and "lartpc" (32 events of 2000-12000 points). Rows:

* padded SDPA: ``F.scaled_dot_product_attention`` on ``(B, H, Lmax, D)`` with a boolean
  key-padding mask (the padded copies are made once, outside the timing);
* nested jagged SDPA: SDPA on ``torch.nested`` jagged-layout views (forward only);
* FlexAttention: compiled ``flex_attention`` on ``(1, H, N', D)`` with a document mask from
  compiled ``create_block_mask`` (built once, outside the timing; N' is N rounded up to 128
  with padding tokens that attend only to themselves; both batches share N', so one compile);
* torch varlen_attn: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2), no bias;
* pcfm triton, pcfm triton + bias: ``pcfm.ops.varlen_attention(backend="triton")`` without and
  with the 3D distance bias (``pos``, ``distance_slope``); its input checks are in the time.

TFLOP/s count only useful work: 4 * sum(n_i^2) * heads * head_dim forward, 3.5x that
forward+backward.

Edge attention: N = 400,000 nodes in 100 events of 4000 random points in a 1 m box, each node's
16 nearest neighbours of its event (``pcfm.ops.knn_graph(backend="torch")``, no self-loops),
nodes sorted by event then Morton code so that neighbours lie close in memory; input features
x ``(N, 256)`` float32. Rows:

* PyG ``TransformerConv(256, 32, heads=8)``: query/key/value/skip Linear layers, per-edge dot
  products, scatter softmax, weighted sum, skip added; eager fp32, torch.compile fp32,
  torch.compile + bf16 autocast;
* pcfm layer: the same TransformerConv's four Linear layers, then
  ``pcfm.ops.edge_attention(backend="triton")``, then the skip: the same work, bf16 autocast;
* pcfm kernel only: ``edge_attention(backend="triton")`` on given bf16 q, k, v ``(N, 8, 32)``;
  GB/s counts the bytes floor (reading q, k, v and writing the output once, plus the int64
  source of every edge).

Timing: synchronised wall time, median of 10 calls after 2 warm-up calls (the first call,
compilation included, is timed apart). "fwd" runs under ``torch.no_grad()``; "fwd+bwd" is the
forward plus ``torch.autograd.grad`` of every input (q, k, v and the slope; for the graph layers
x and every weight). Peak memory: ``torch.cuda.max_memory_allocated()`` during one call minus
what was allocated before it (inputs excluded). Correctness: each row's output and input
gradients (q, k, v, or x) on the first events against pcfm's float32 reference, as
max |error| / max |reference|. A row that fails records "error: ..." and the run goes on; a
row whose estimated time (compilation included) exceeds what is left of ``--budget`` seconds
is skipped with the reason; results are rewritten after every row, so a run cut short keeps
what it measured.

Without CUDA (or with ``--device cpu``) the rows that run on CPU (padded and nested SDPA, pcfm's
reference with and without bias, TransformerConv eager, the layer on pcfm's reference) are
measured at ``--scale`` of the sizes (default 0.01), the others are listed as skipped: CPU
numbers are not performance claims.

    python benchmarks/kernels.py [--quick] [--only varlen|edge] [--out-dir DIR] [--scale S]
                                 [--device cuda|cpu] [--budget SECONDS]

from the repository root with pcfm importable. Output: DIR/kernels.json and DIR/kernels.md
(default benchmarks/results/kernels.json, or kernels_cpu.json for a CPU run).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import io
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from _common import RESULTS_DIR, announce, markdown_table, write_results
from cluster_ops import BATCHES
from pcfm.io import atomic_path
from pcfm.ops import edge_attention, knn_graph, varlen_attention
from pcfm.ops.attention import edge_attention_reference, varlen_attention_reference

HEADS, HEAD_DIM = 8, 64
EDGE_NODES, EDGE_K, EDGE_CHANNELS, EDGE_HEADS = 400_000, 16, 256, 8
NODES_PER_EVENT = 4000
#: Tokens (or graph nodes) of the first events whose outputs are checked against the reference.
CHECK_TOKENS = 4096
#: Longest a single timing loop may run once its first 3 calls are done (seconds).
TIMING_CAP_S = 20.0
FLEX_BLOCK = 128

# Targets of issue 3 (H100).
EDGE_SPEEDUP_EAGER, EDGE_SPEEDUP_COMPILED, EDGE_MEMORY_FRACTION = 10.0, 2.0, 0.2
VARLEN_BIAS_SLOWDOWN = 1.25


@dataclass
class Options:
    device: torch.device
    dtype: torch.dtype = torch.bfloat16
    scale: float = 1.0
    repeats: int = 10
    warmup: int = 2
    budget_s: float = 420.0
    only: Optional[str] = None
    seed: int = 0
    compile_backend: str = "inductor"
    #: For the CPU smoke test only: run the GPU rows on CPU (kernels in Triton's interpreter,
    #: torch.compile with ``compile_backend``).
    gpu_rows_on_cpu: bool = False


@dataclass
class Method:
    """A benchmark row: what runs and where it can run."""

    label: str
    runs_on: str           # "any", "cuda" (no CPU path), "gpu" (CUDA, or CPU in the smoke test), "cpu"
    fwd_only: bool = False
    estimate_s: float = 15.0        # budget needed to start the row the first time ...
    warm_estimate_s: float = 10.0   # ... and once the same method has run (compiled already)
    fwd_estimate_s: float = 0.0     # extra budget the no-grad forward needs (a second compile)


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

# The GPU run goes by priority: the target rows first, the long compilations last.
GPU_PLAN = [
    ("varlen", "showers", ["pcfm_triton", "pcfm_triton_bias", "torch_varlen"]),
    ("varlen", "lartpc", ["pcfm_triton", "pcfm_triton_bias", "torch_varlen"]),
    ("edge", "knn", ["pcfm_layer", "pcfm_kernel", "pyg_eager", "pyg_compiled_bf16"]),
    ("varlen", "showers", ["padded_sdpa", "nested_sdpa"]),
    ("varlen", "lartpc", ["padded_sdpa", "nested_sdpa"]),
    ("varlen", "showers", ["flex"]),
    ("varlen", "lartpc", ["flex"]),
    ("edge", "knn", ["pyg_compiled"]),
]


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


@dataclass
class Case:
    """A prepared row: ``forward()`` runs the op; gradients are taken for ``inputs``.

    ``to_rows`` maps the op's output (and the gradients of its first inputs) to one row per
    token or node, for the comparison with the reference; ``checked_inputs`` says how many
    of ``inputs`` have such a gradient (the others are the slope or the weights).
    """

    forward: Callable[[], Tensor]
    inputs: list[Tensor]
    grad_output: Optional[Tensor]
    to_rows: Callable[[Tensor], Tensor] = lambda tensor: tensor
    checked_inputs: int = 3
    notes: dict = field(default_factory=dict)


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


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], options: Options) -> tuple[float, int]:
    """Median wall time of ``fn`` in ms after the warm-up calls, and how many calls it timed."""
    for _ in range(options.warmup):
        fn()
    synchronize(options.device)
    times = []
    for _ in range(options.repeats):
        start = time.perf_counter()
        fn()
        synchronize(options.device)
        times.append(time.perf_counter() - start)
        if len(times) >= 3 and sum(times) > TIMING_CAP_S:
            break
    return 1000.0 * statistics.median(times), len(times)


def peak_gib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory ``fn`` allocates at its peak beyond what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**30


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|."""
    scale = want.double().abs().max().item()
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def measure(case: Case, method: Method, reference: Callable[[], tuple[Tensor, list[Tensor]]],
            rows_checked: int, run: "Run") -> dict:
    """Check, then time and weigh one prepared row; every failure is recorded, never raised."""
    options, result, problems = run.options, {}, []
    start = time.perf_counter()
    backward = not method.fwd_only and case.grad_output is not None
    out = grads = None
    if backward:  # the first call compiles
        try:
            out = case.forward()
            case.grad_output = case.grad_output.to(out.dtype)
            grads = torch.autograd.grad(out, case.inputs, case.grad_output)
        except Exception as error:
            problems.append(f"fwd+bwd: {describe(error)}")
            backward = False
    if not backward:
        try:
            with torch.no_grad():
                out = case.forward()
        except Exception as error:
            return {"status": "; ".join(problems + [f"error: {describe(error)}"])}
    synchronize(options.device)
    result["first_call_s"] = round(time.perf_counter() - start, 2)
    try:
        want_out, want_grads = reference()
        result["rel_err_out"] = relative_error(case.to_rows(out)[:rows_checked], want_out)
        if grads is not None:
            result["rel_err_grad"] = max(relative_error(case.to_rows(grad)[:rows_checked], want)
                                         for grad, want in zip(grads[:case.checked_inputs], want_grads))
    except Exception as error:
        problems.append(f"check: {describe(error)}")
    del out, grads

    def fwd():
        with torch.no_grad():
            return case.forward()

    def fwd_bwd():
        return torch.autograd.grad(case.forward(), case.inputs, case.grad_output)

    for key, fn, wanted in (("fwdbwd", fwd_bwd, backward), ("fwd", fwd, True)):
        if not wanted:
            continue
        if key == "fwd" and run.left() < method.fwd_estimate_s:
            problems.append(f"fwd skipped: budget ({run.left():.0f} s left)")
            continue
        try:
            result[f"{key}_ms"], result["repeats"] = median_ms(fn, options)
            result[f"{key}_peak_gib"] = peak_gib(fn, options.device)
        except Exception as error:
            problems.append(f"{key}: {describe(error)}")
    result["status"] = "ok" if not problems else "; ".join(problems)
    return result


# ----------------------------------------------------------------------------- the run


class Run:
    """Budget, clock, the rows so far and the files they are written to."""

    def __init__(self, options: Options, json_path: Path, command: str = "", machine: Optional[dict] = None):
        self.options, self.json_path = options, json_path
        self.command, self.machine = command, machine or {}
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.shared: dict = {}
        self.batches: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.options.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def skip_reason(self, method_key: str, method: Method) -> Optional[str]:
        """Why ``method`` cannot run here, or None."""
        on_cuda = self.options.device.type == "cuda"
        if method.runs_on == "cuda" and not on_cuda:
            return "skipped: needs CUDA (GPU-only row)"
        if method.runs_on == "gpu" and not on_cuda and not self.options.gpu_rows_on_cpu:
            return "skipped: GPU-only row (fused kernels or torch.compile)"
        ran_before = any(row.get("method_key") == method_key and row.get("first_call_s") is not None
                         for row in self.rows)
        needed = method.warm_estimate_s if ran_before else method.estimate_s
        if self.left() < needed:
            return f"skipped: budget ({self.left():.0f} s left, the row needs about {needed:.0f} s)"
        return None

    def varlen_batch(self, name: str) -> RaggedBatch:
        if name not in self.batches:
            self.batches[name] = ragged_batch(name, self.options)
            batch = self.batches[name]
            self.log(f"batch {name}: {len(batch.sizes)} events, {batch.tokens} tokens")
        return self.batches[name]

    def edge_graph(self) -> Graph:
        if "knn" not in self.batches:
            self.log("building the kNN graph")
            self.batches["knn"] = knn_input(self.options)
            graph = self.batches["knn"]
            self.log(f"graph: {graph.nodes} nodes in {graph.events} events, {graph.edge_index.shape[1]} edges, "
                     f"kNN built in {graph.build_s:.1f} s")
        return self.batches["knn"]

    def run_row(self, section: str, batch_name: str, method_key: str) -> None:
        methods = VARLEN_METHODS if section == "varlen" else EDGE_METHODS
        method = methods[method_key]
        row = {"section": section, "batch": batch_name, "method_key": method_key, "method": method.label}
        reason = self.skip_reason(method_key, method)
        self.log(f"{section} {batch_name}: {method.label}")
        if reason is None:
            try:
                row.update(self._measure(section, batch_name, method_key, method))
            except Exception as error:
                row["status"] = f"error: {describe(error)}"
            if self.options.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        else:
            row["status"] = reason
        self.rows.append(row)
        self.log(f"  -> {summary(row)}")
        self.save(quiet=True)

    def _measure(self, section: str, batch_name: str, method_key: str, method: Method) -> dict:
        if section == "varlen":
            batch = self.varlen_batch(batch_name)
            if method_key == "flex":  # one padded length for every batch: one compilation
                longest = max(self.varlen_batch(name).tokens for name in BATCHES)
                self.shared.setdefault("flex", {"length": -(-longest // FLEX_BLOCK) * FLEX_BLOCK})
            info = {"size": batch.tokens, "events": len(batch.sizes), "dtype": str(self.options.dtype)[6:]}
            case = VARLEN_CASES[method_key](batch, self.options, self.shared)
            with_bias = method_key.endswith("_bias")
            cache = self.shared.setdefault("varlen_reference", {})

            def reference() -> tuple[Tensor, list[Tensor]]:  # shared by the rows of a batch
                if (batch_name, with_bias) not in cache:
                    cache[(batch_name, with_bias)] = varlen_reference(batch, with_bias)
                return cache[(batch_name, with_bias)]
            result = measure(case, method, reference, batch.checked_tokens(), self)
            for key in ("fwd", "fwdbwd"):
                if result.get(f"{key}_ms"):
                    flops = batch.fwd_flops * (3.5 if key == "fwdbwd" else 1.0)
                    result[f"{key}_tflops"] = flops / (result[f"{key}_ms"] * 1e-3) / 1e12
        else:
            graph = self.edge_graph()
            info = {"size": graph.nodes, "events": graph.events, "edges": graph.edge_index.shape[1],
                    "knn_build_s": round(graph.build_s, 2), "dtype": edge_dtype(method_key, self.options)}
            case = edge_case(method_key, graph, self.options)
            result = measure(case, method, lambda: edge_reference(graph, method_key, case), graph.checked_nodes, self)
            if "floor_bytes" in case.notes and result.get("fwd_ms"):
                result["fwd_gbps"] = case.notes["floor_bytes"] / (result["fwd_ms"] * 1e-3) / 1e9
        return {**info, **case.notes, **result}

    def results(self) -> list[dict]:
        return self.rows + verdicts(self.rows, self.options)

    def save(self, quiet: bool = False) -> None:
        """Write the JSON (through write_results) and the markdown report beside it."""
        sink = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
        with sink:
            write_results(self.json_path.stem, self.command, self.machine, self.results(), self.json_path)
        with atomic_path(self.json_path.with_suffix(".md")) as tmp:
            tmp.write_text(report(self) + "\n")


def edge_dtype(method_key: str, options: Options) -> str:
    if method_key in ("pyg_eager", "pyg_compiled", "pcfm_reference_layer"):
        return "float32"
    if method_key == "pyg_compiled_bf16":
        return "bfloat16 autocast"
    name = str(options.dtype)[6:]
    return name if method_key == "pcfm_kernel" or options.dtype == torch.float32 else f"{name} autocast"


def summary(row: dict) -> str:
    parts = [f"{key}={row[key]:.3g}" for key in ("fwd_ms", "fwdbwd_ms", "fwdbwd_peak_gib", "rel_err_out",
                                                 "rel_err_grad") if row.get(key) is not None]
    return " ".join(parts + [row.get("status", "")])


def plan(options: Options) -> list[tuple[str, str, str]]:
    """(section, batch, method) in the order they run: by priority on CUDA, by table on CPU."""
    if options.device.type == "cuda":
        steps = [(section, batch, key) for section, batch, keys in GPU_PLAN for key in keys]
    else:
        steps = [("varlen", batch, key) for batch in BATCHES for key in VARLEN_METHODS]
        steps += [("edge", "knn", key) for key in EDGE_METHODS]
    return [step for step in steps if options.only in (None, step[0])]


def run_benchmarks(options: Options, json_path: Path, command: str = "", machine: Optional[dict] = None) -> Run:
    """Measure every planned row, writing the results after each; returns the finished run."""
    if options.device.type == "cpu":
        print("CPU run at reduced sizes: these numbers test the script, they are not performance claims.")
    run = Run(options, json_path, command, machine)
    for section, batch, method_key in plan(options):
        run.run_row(section, batch, method_key)
    run.save()
    return run


# ----------------------------------------------------------------------------- report


def ordered(rows: list[dict], section: str, methods: dict) -> list[dict]:
    keys, batches = list(methods), list(BATCHES) + ["knn"]
    chosen = [row for row in rows if row["section"] == section]
    return sorted(chosen, key=lambda row: (batches.index(row["batch"]), keys.index(row["method_key"])))


def verdicts(rows: list[dict], options: Options) -> list[dict]:
    """The issue's targets, each with its measured ratio (not evaluated on CPU)."""
    def find(section: str, batch: str, key: str) -> dict:
        wanted = (section, batch, key)
        return next((row for row in rows if (row["section"], row["batch"], row["method_key"]) == wanted), {})

    targets = []  # (target, numerator row, denominator row, measured key, bound, ratio must stay at most bound)
    if options.only in (None, "varlen"):
        for batch in BATCHES:
            targets.append((f"{batch}: pcfm triton + bias fwd+bwd / torch varlen_attn (no bias) fwd+bwd "
                            f"<= {VARLEN_BIAS_SLOWDOWN}", find("varlen", batch, "pcfm_triton_bias"),
                            find("varlen", batch, "torch_varlen"), "fwdbwd_ms", VARLEN_BIAS_SLOWDOWN, True))
    if options.only in (None, "edge"):
        layer, eager, compiled = (find("edge", "knn", key)
                                  for key in ("pcfm_layer", "pyg_eager", "pyg_compiled_bf16"))
        targets += [
            (f"edge: TransformerConv eager fp32 fwd+bwd / pcfm layer fwd+bwd >= {EDGE_SPEEDUP_EAGER}",
             eager, layer, "fwdbwd_ms", EDGE_SPEEDUP_EAGER, False),
            (f"edge: TransformerConv compiled bf16 fwd+bwd / pcfm layer fwd+bwd >= {EDGE_SPEEDUP_COMPILED}",
             compiled, layer, "fwdbwd_ms", EDGE_SPEEDUP_COMPILED, False),
            (f"edge: pcfm layer / TransformerConv compiled bf16, peak memory fwd+bwd <= {EDGE_MEMORY_FRACTION}",
             layer, compiled, "fwdbwd_peak_gib", EDGE_MEMORY_FRACTION, True),
        ]
    found = []
    for target, top_row, bottom_row, key, bound, at_most in targets:
        entry = {"section": "verdict", "target": target, "bound": bound}
        top, bottom = top_row.get(key), bottom_row.get(key)
        if options.device.type != "cuda":
            entry["verdict"] = "not evaluated (CPU run)"
        elif not top or not bottom:
            entry["verdict"] = "not evaluated (a row is missing)"
        else:
            ratio = entry["measured"] = top / bottom
            entry["verdict"] = "PASS" if (ratio <= bound if at_most else ratio >= bound) else "FAIL"
        found.append(entry)
    return found


VARLEN_COLUMNS = [("batch", "batch", ""), ("tokens", "size", "d"), ("method", "method", ""),
                  ("fwd ms", "fwd_ms", ".2f"), ("fwd TFLOP/s", "fwd_tflops", ".1f"),
                  ("fwd+bwd ms", "fwdbwd_ms", ".2f"), ("fwd+bwd TFLOP/s", "fwdbwd_tflops", ".1f"),
                  ("peak fwd GiB", "fwd_peak_gib", ".2f"), ("peak fwd+bwd GiB", "fwdbwd_peak_gib", ".2f"),
                  ("rel err out", "rel_err_out", ".1e"), ("rel err grad", "rel_err_grad", ".1e"),
                  ("first call s", "first_call_s", ".1f"), ("status", "status", "")]
EDGE_COLUMNS = [("method", "method", ""), ("dtype", "dtype", ""), ("fwd ms", "fwd_ms", ".2f"),
                ("fwd GB/s (floor)", "fwd_gbps", ".0f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
                ("peak fwd GiB", "fwd_peak_gib", ".2f"), ("peak fwd+bwd GiB", "fwdbwd_peak_gib", ".2f"),
                ("rel err out", "rel_err_out", ".1e"), ("rel err grad", "rel_err_grad", ".1e"),
                ("first call s", "first_call_s", ".1f"), ("status", "status", "")]


def report(run: Run) -> str:
    """Markdown: the two tables, what each row includes, and the verdicts."""
    options, rows = run.options, run.rows
    gpu = run.machine.get("gpu", options.device.type)
    lines = ["## Attention kernels (`benchmarks/kernels.py`)", "",
             f"`{run.command}` — {gpu}, torch {torch.__version__}, triton {run.machine.get('triton', '-')}, "
             f"torch-geometric {run.machine.get('torch_geometric', '-')}, "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}, {run.elapsed():.0f} s in all.", ""]
    if options.device.type != "cuda":
        lines += ["**CPU run at reduced sizes (scale {:g}): these numbers test the script, they are not "
                  "performance claims.**".format(options.scale), ""]
    varlen_rows = ordered(rows, "varlen", VARLEN_METHODS)
    if varlen_rows:
        lines += [f"Varlen attention, {str(options.dtype)[6:]}, {HEADS} heads x {HEAD_DIM}; TFLOP/s count "
                  "4 sum(n_i^2) H D forward and 3.5x that forward+backward; errors are max |error| / "
                  "max |reference| on the first events against pcfm's float32 reference.", "",
                  markdown_table(varlen_rows, VARLEN_COLUMNS), ""]
    edge_rows = ordered(rows, "edge", EDGE_METHODS)
    if edge_rows:
        first = next((row for row in edge_rows if "size" in row), edge_rows[0])
        lines += [f"Edge attention, kNN graph of {first.get('size', '-')} nodes in {first.get('events', '-')} "
                  f"events, k = {EDGE_K}, {first.get('edges', '-')} edges, {EDGE_CHANNELS} channels, "
                  f"{EDGE_HEADS} heads. PyG rows and the pcfm layer include the four Linear layers "
                  "(query, key, value, skip) and take gradients for x and every weight; the kernel-only "
                  "row takes q, k, v. fwd GB/s = (q, k, v read + output written once + 8 bytes per edge) / time.",
                  "", markdown_table(edge_rows, EDGE_COLUMNS), ""]
    lines.append("Targets (H100):")
    for entry in verdicts(rows, options):
        measured = f" — measured {entry['measured']:.2f}" if "measured" in entry else ""
        lines.append(f"- {entry['target']}: **{entry['verdict']}**{measured}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_options(argv: Optional[list[str]] = None) -> tuple[Options, Optional[Path]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed calls after 1 warm-up (default 10 after 2)")
    parser.add_argument("--only", choices=("varlen", "edge"))
    parser.add_argument("--out-dir", type=Path, help="write kernels.json and kernels.md there")
    parser.add_argument("--scale", type=float, help="fraction of the sizes (default 1 on CUDA, 0.01 on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which no row starts (default 420)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.01)
    options = Options(device=device, scale=scale, repeats=3 if args.quick else 10, warmup=1 if args.quick else 2,
                      budget_s=args.budget, only=args.only)
    return options, args.out_dir


def default_json_path(options: Options, out_dir: Optional[Path]) -> Path:
    name = "kernels" if options.device.type == "cuda" else "kernels_cpu"
    return (out_dir / "kernels.json") if out_dir else RESULTS_DIR / f"{name}.json"


def main(argv: Optional[list[str]] = None) -> Run:
    options, out_dir = parse_options(argv)
    command, machine = announce()
    machine.update(library_versions())
    run = run_benchmarks(options, default_json_path(options, out_dir), command, machine)
    print()
    print(report(run))
    return run


def library_versions() -> dict:
    versions = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
    for name in ("triton", "torch_geometric"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as error:  # a missing or broken install is recorded, not fatal
            versions[name] = f"unavailable ({describe(error)})"
    return versions


if __name__ == "__main__":
    main()
