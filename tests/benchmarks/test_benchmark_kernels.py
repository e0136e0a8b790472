"""benchmarks/kernels.py at toy sizes on CPU: every row's code path runs and matches pcfm's
reference, GPU-only rows are skipped with their reason, and the JSON and markdown are written.

The GPU rows run here through Triton's interpreter and torch.compile's "eager" backend, with
fewer heads and channels than the real benchmark so that the interpreter stays fast.
"""
import json
import os
import sys

import pytest
import torch

from tests.benchmark_loader import load_benchmark

bench = load_benchmark("kernels")
import cluster_ops  # noqa: E402  benchmarks/ is on sys.path now
import kernels_cases  # noqa: E402
import kernels_report  # noqa: E402

CPU = torch.device("cpu")


def set_sizes(monkeypatch, **sizes):
    """Set each size in every module of the benchmark that reads it (kernels.py and its siblings)."""
    for name, value in sizes.items():
        holders = [module for module in (bench, kernels_cases, kernels_report) if hasattr(module, name)]
        assert holders, name
        for module in holders:
            monkeypatch.setattr(module, name, value)


@pytest.fixture
def toy_sizes(monkeypatch):
    """One small varlen batch, a small graph, narrow heads: the interpreter runs every program in Python."""
    set_sizes(monkeypatch, BATCHES={"showers": bench.BATCHES["showers"]}, HEADS=2, HEAD_DIM=16, EDGE_CHANNELS=32,
              EDGE_HEADS=2, EDGE_NODES=100_000, EDGE_K=4)  # EDGE_NODES: 10 nodes at scale 1e-4
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy sizes: threads only add synchronisation
    yield
    torch.set_num_threads(threads)


def rows_by_method(rows):
    return {(row["section"], row["method_key"]): row for row in rows if row["section"] != "verdict"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the benchmark itself runs these rows")
def test_every_row_runs_on_cpu_and_matches_the_reference(toy_sizes, tmp_path):
    pytest.importorskip("triton", reason="the fused kernels' rows need triton (interpreted on CPU)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=0 was set by the user: without a GPU the kernels cannot run")
    options = bench.Options(device=CPU, dtype=torch.float32, scale=1e-4, repeats=1, warmup=0,
                            compile_backend="eager", gpu_rows_on_cpu=True)
    run = bench.run_benchmarks(options, tmp_path / "kernels.json", command="test", machine={})
    rows = rows_by_method(run.rows)
    expected = {("varlen", key) for key in bench.VARLEN_METHODS} | {("edge", key) for key in bench.EDGE_METHODS}
    assert set(rows) == expected

    assert rows[("varlen", "torch_varlen")]["status"] == "skipped: needs CUDA (GPU-only row)"
    # FlexAttention has no CPU backward (today): the forward is still measured and checked.
    flex = rows[("varlen", "flex")]
    assert flex["status"] == "ok" or flex["status"].startswith("fwd+bwd: NotImplementedError")
    for key, row in rows.items():
        if key == ("varlen", "torch_varlen"):
            continue
        assert row["fwd_ms"] > 0, row
        # float32 everywhere but the bf16-autocast row: agreement to rounding
        bound = 2e-2 if key == ("edge", "pyg_compiled_bf16") else 1e-5
        assert row["rel_err_out"] < bound, row
        if key not in (("varlen", "nested_sdpa"), ("varlen", "flex")):
            assert row["status"] == "ok", row
            assert row["fwdbwd_ms"] > 0 and row["rel_err_grad"] < bound, row
    assert rows[("varlen", "pcfm_triton")]["size"] == rows[("varlen", "padded_sdpa")]["size"] == 34
    assert rows[("edge", "pcfm_kernel")]["edges"] == 10 * 4

    written = json.loads((tmp_path / "kernels.json").read_text())
    assert written["command"] == "test"
    assert len([row for row in written["results"] if row["section"] != "verdict"]) == len(expected)
    report = (tmp_path / "kernels.md").read_text()
    assert "| showers | 34 | padded SDPA, key-padding mask |" in report
    assert "not performance claims" in report


def test_cpu_command_line_skips_gpu_rows_with_their_reason(toy_sizes, tmp_path, capsys, monkeypatch):
    argv = ["--device", "cpu", "--scale", "1e-4", "--quick", "--only", "edge", "--out-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/kernels.py"] + argv)  # what announce() records
    bench.main(argv)
    written = json.loads((tmp_path / "kernels.json").read_text())
    rows = rows_by_method(written["results"])
    assert set(rows) == {("edge", key) for key in bench.EDGE_METHODS}
    for key in ("pyg_eager", "pcfm_reference_layer"):
        assert rows[("edge", key)]["status"] == "ok"
        assert rows[("edge", key)]["rel_err_out"] < 1e-5
    for key in ("pyg_compiled", "pyg_compiled_bf16", "pcfm_layer", "pcfm_kernel"):
        assert rows[("edge", key)]["status"] == "skipped: GPU-only row (fused kernels or torch.compile)"
    verdicts = [row for row in written["results"] if row["section"] == "verdict"]
    assert len(verdicts) == 3 and all(row["verdict"] == "not evaluated (CPU run)" for row in verdicts)
    assert "torch_geometric" in written["machine"] and "--only edge" in written["command"]
    printed = capsys.readouterr().out
    assert "not performance claims" in printed
    assert printed.count("| PyG TransformerConv, eager fp32 | float32 |") == 1
    assert (tmp_path / "kernels.md").read_text().strip() in printed


def test_rows_past_the_budget_are_skipped_with_the_reason(toy_sizes, tmp_path):
    options = bench.Options(device=CPU, scale=1e-4, budget_s=0.0, only="varlen")
    run = bench.run_benchmarks(options, tmp_path / "kernels.json", command="test", machine={})
    rows = rows_by_method(run.rows)
    for key in ("padded_sdpa", "nested_sdpa", "pcfm_reference", "pcfm_reference_bias"):
        assert rows[("varlen", key)]["status"].startswith("skipped: budget"), rows[("varlen", key)]
        assert "fwd_ms" not in rows[("varlen", key)]


def test_gpu_plan_runs_every_gpu_row_once_targets_first():
    steps = bench.plan(bench.Options(device=torch.device("cuda")))
    assert len(steps) == len(set(steps))
    gpu_rows = {("varlen", batch, key) for batch in bench.BATCHES for key, method in bench.VARLEN_METHODS.items()
                if method.runs_on != "cpu"}
    gpu_rows |= {("edge", "knn", key) for key, method in bench.EDGE_METHODS.items() if method.runs_on != "cpu"}
    assert set(steps) == gpu_rows
    # the rows the targets need come before the long compilations that are not targets
    last_target = max(steps.index(("varlen", batch, key)) for batch in bench.BATCHES
                      for key in ("pcfm_triton_bias", "torch_varlen"))
    last_target = max(last_target, steps.index(("edge", "knn", "pyg_compiled_bf16")))
    assert last_target < steps.index(("varlen", "showers", "flex")) < steps.index(("edge", "knn", "pyg_compiled"))
    assert bench.plan(bench.Options(device=torch.device("cuda"), only="edge")) == [s for s in steps if s[0] == "edge"]


def test_batches_are_those_of_the_cluster_benchmark(monkeypatch):
    set_sizes(monkeypatch, HEADS=1, HEAD_DIM=1)
    batch = bench.ragged_batch("showers", bench.Options(device=CPU))
    pos, event = cluster_ops.ragged_batch("showers", CPU)
    assert batch.tokens == 204970 and len(batch.sizes) == 256  # as in benchmarks/RESULTS.md
    assert torch.equal(batch.pos, pos)
    assert torch.equal(batch.ptr, torch.cat([torch.zeros(1, dtype=torch.long), event.bincount().cumsum(0)]))
    assert batch.fwd_flops == 4.0 * sum(n * n for n in batch.sizes)
    assert bench.ragged_batch("lartpc", bench.Options(device=CPU)).tokens == 210317


def test_verdicts_and_report_of_a_gpu_run(tmp_path):
    def row(section, batch, key, **measured):
        return {"section": section, "batch": batch, "method_key": key, "method": key, **measured}

    rows = [row("varlen", "showers", "pcfm_triton_bias", fwdbwd_ms=9.0),
            row("varlen", "showers", "torch_varlen", fwdbwd_ms=8.0),
            row("varlen", "lartpc", "pcfm_triton_bias", fwdbwd_ms=60.0),
            row("varlen", "lartpc", "torch_varlen", status="error: RuntimeError: no kernel"),
            row("edge", "knn", "pyg_eager", fwdbwd_ms=140.0, fwdbwd_peak_gib=36.0),
            row("edge", "knn", "pyg_compiled_bf16", fwdbwd_ms=60.0, fwdbwd_peak_gib=12.0),
            row("edge", "knn", "pcfm_layer", fwdbwd_ms=10.0, fwdbwd_peak_gib=3.0)]
    options = bench.Options(device=torch.device("cuda"))
    found = {entry["target"].split(":")[0] + str(entry["bound"]): entry for entry in bench.verdicts(rows, options)}
    assert found["showers1.25"]["verdict"] == "PASS" and found["showers1.25"]["measured"] == pytest.approx(9 / 8)
    assert found["lartpc1.25"]["verdict"] == "not evaluated (a row is missing)"
    assert found["edge10.0"]["verdict"] == "PASS" and found["edge10.0"]["measured"] == pytest.approx(14.0)
    assert found["edge2.0"]["verdict"] == "PASS" and found["edge2.0"]["measured"] == pytest.approx(6.0)
    assert found["edge0.2"]["verdict"] == "FAIL" and found["edge0.2"]["measured"] == pytest.approx(0.25)

    run = bench.Run(options, tmp_path / "kernels.json", command="python benchmarks/kernels.py",
                    machine={"gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0"})
    run.rows = rows
    report = bench.report(run)
    assert "NVIDIA H100 80GB HBM3" in report and "not performance claims" not in report
    assert "fwd+bwd <= 1.25: **PASS** — measured 1.12" in report
    assert "peak memory fwd+bwd <= 0.2: **FAIL** — measured 0.25" in report
    assert "| lartpc | - | torch_varlen |" + " - |" * 9 + " error: RuntimeError: no kernel |" in report
