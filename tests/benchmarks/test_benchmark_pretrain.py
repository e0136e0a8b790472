"""benchmarks/pretrain_throughput.py at tiny sizes on CPU: the padded baseline computes the same
attention as pcfm's ragged one, both variants train, and the JSON, markdown and verdicts are written."""
import json
import sys

import pytest
import torch

from pcfm.nn import GlobalAttention
from pcfm.ops.attention import varlen_attention_reference
from tests.benchmark_loader import load_benchmark

bench = load_benchmark("pretrain_throughput")

CPU = torch.device("cpu")


def test_padded_attention_equals_ragged_attention_with_distance_bias():
    torch.manual_seed(0)
    layer = GlobalAttention(16, 4, distance_scales=(1.0, 100.0), backend="reference").double()
    ptr = torch.tensor([0, 1, 6, 6, 13])  # a one-token event, an empty one, unequal lengths
    x = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.rand(13, 3, dtype=torch.float64) * 50.0
    ragged = layer(x, pos, ptr)
    ragged_grads = torch.autograd.grad(ragged.square().sum(), [x, layer.raw_slope])
    with bench.padded_global_attention():
        assert GlobalAttention.forward is bench.padded_forward
        padded = layer(x, pos, ptr)
    assert GlobalAttention.forward is not bench.padded_forward  # restored
    padded_grads = torch.autograd.grad(padded.square().sum(), [x, layer.raw_slope])
    torch.testing.assert_close(padded, ragged, rtol=1e-6, atol=1e-6)  # pos goes through float32
    for got, want in zip(padded_grads, ragged_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the distance bias matters here: without it the outputs differ
    q, k, v = layer.qkv(x).unflatten(1, (3, 4, -1)).unbind(1)
    unbiased = layer.out(varlen_attention_reference(q, k, v, ptr).flatten(1))
    assert (unbiased - ragged).abs().max() > 1e-2


def test_cpu_run_checks_times_and_reports_both_variants(tmp_path, capsys, monkeypatch):
    argv = ["--device", "cpu", "--quick", "--batch-points", "1500", "--lartpc-points", "300", "700",
            "--out-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/pretrain_throughput.py"] + argv)  # what announce() records
    calls = []
    monkeypatch.setattr(bench, "padded_forward", lambda *a, _f=bench.padded_forward: calls.append(1) or _f(*a))
    bench.main(argv)
    written = json.loads((tmp_path / "pretrain_throughput.json").read_text())
    assert "--lartpc-points 300 700" in written["command"] and "cpu" in written["machine"]
    rows = written["results"]
    checks = {row["kind"]: row for row in rows if row["section"] == "check"}
    timed = {(row["kind"], row["variant"]): row for row in rows if row["section"] == "throughput"}
    assert set(checks) == set(bench.BATCH_KINDS)
    assert set(timed) == {(kind, variant) for kind in bench.BATCH_KINDS for variant in bench.VARIANTS}
    assert calls  # the padded rows ran the padded attention
    for check in checks.values():
        assert check["status"] == "ok" and check["check_events"] >= 1
        assert check["loss_rel_diff"] < 1e-5 and check["grad_rel_diff"] < 1e-4, check
    for (kind, variant), row in timed.items():
        assert row["status"] == "ok", row
        assert 1 <= row["events"] and row["points"] <= 1500
        assert row["events_per_s"] == pytest.approx(row["events"] / (row["ms_per_step"] / 1e3))
        assert row["points_per_s"] == pytest.approx(row["points"] / (row["ms_per_step"] / 1e3))
        assert row["steps_timed"] == 1 and "peak_gib" not in row
        # tokens of at most 16 points (tiny), every point in one: at least points / 16, one per event
        assert max(row["events"], row["points"] // 16) <= row["tokens"] <= row["points"] // 3 + row["events"]
    # both variants train the same batch from the same weights
    for kind in bench.BATCH_KINDS:
        assert timed[(kind, "ragged")]["tokens"] == timed[(kind, "padded")]["tokens"]
        assert timed[(kind, "ragged")]["last_loss"] == pytest.approx(timed[(kind, "padded")]["last_loss"], rel=1e-3)
    verdicts = [row for row in rows if row["section"] == "verdict"]
    assert [v["verdict"] for v in verdicts] == ["not evaluated (CPU run)"] * 2
    report = (tmp_path / "pretrain_throughput.md").read_text()
    assert "CPU numbers are not the target" in report
    assert "| ragged | lartpc |" in report and "| padded | showers |" in report
    assert report.strip() in capsys.readouterr().out


def test_rows_past_the_budget_are_skipped_with_the_reason(tmp_path):
    options = bench.Options(device=CPU, model="tiny", batch_points=600, lartpc_points=(300, 500), steps=1,
                            warmup=1, budget_s=0.0, only="showers")
    run = bench.run_benchmark(options, tmp_path / "out.json", command="test", machine={})
    timed = [row for row in run.rows if row["section"] == "throughput"]
    assert len(timed) == 2
    for row in timed:
        assert row["status"].startswith("skipped: budget"), row
        assert "events_per_s" not in row
    assert run.rows[-1]["verdict"] == "not evaluated (a row is missing)"


def test_verdicts_of_a_gpu_run():
    def row(kind, variant, events_per_s):
        return {"section": "throughput", "kind": kind, "variant": variant, "events_per_s": events_per_s}

    rows = [row("showers", "ragged", 300.0), row("showers", "padded", 200.0),
            row("lartpc", "ragged", 50.0), row("lartpc", "padded", 20.0)]
    found = {v["kind"]: v for v in bench.verdicts(rows, bench.Options(device=torch.device("cuda")))}
    assert found["lartpc"]["verdict"] == "PASS" and found["lartpc"]["measured"] == pytest.approx(2.5)
    assert found["showers"]["verdict"] == "measured" and found["showers"]["measured"] == pytest.approx(1.5)
    rows[2]["events_per_s"] = 39.0
    found = {v["kind"]: v for v in bench.verdicts(rows, bench.Options(device=torch.device("cuda")))}
    assert found["lartpc"]["verdict"] == "FAIL" and found["lartpc"]["measured"] == pytest.approx(1.95)
