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

This file holds the run, its plan and the command line; the options, the rows' :class:`Case`
and the measuring are in ``kernels_measure.py``, the sizes, method tables, inputs, row builders
and references in ``kernels_cases.py``, the verdicts and the markdown report in
``kernels_report.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from _common import RESULTS_DIR, announce, write_results
from cluster_ops import BATCHES
from kernels_cases import (EDGE_METHODS, VARLEN_CASES, VARLEN_METHODS, Graph, RaggedBatch, edge_case,
                           edge_reference, knn_input, ragged_batch, varlen_reference)
from kernels_measure import Method, Options, describe, measure
from kernels_report import report, verdicts
from pcfm.io import atomic_path

FLEX_BLOCK = 128


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
