"""The verdicts (the targets of issue 3) and the markdown report of benchmarks/kernels.py.

Separate from kernels.py so that the script holds the run and the command line; the report
needs only the rows, the method tables and the sizes (kernels_cases.py).
"""
from __future__ import annotations

from datetime import datetime, timezone

import torch

from _common import markdown_table
from cluster_ops import BATCHES
from kernels_cases import EDGE_CHANNELS, EDGE_HEADS, EDGE_K, EDGE_METHODS, HEAD_DIM, HEADS, VARLEN_METHODS
from kernels_measure import Options

# Targets of issue 3 (H100).
EDGE_SPEEDUP_EAGER, EDGE_SPEEDUP_COMPILED, EDGE_MEMORY_FRACTION = 10.0, 2.0, 0.2
VARLEN_BIAS_SLOWDOWN = 1.25


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


def report(run) -> str:
    """Markdown: the two tables, what each row includes, and the verdicts (``run``: kernels.py's ``Run``)."""
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
