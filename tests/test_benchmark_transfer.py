"""benchmarks/transfer.py at its micro size: every task and arm runs, the JSON holds finite metrics
for every run, the aggregates and target checks follow from them, the markdown and plot are
written, and a rerun reuses the finished pretrainings and fine-tunes."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from tests.benchmark_loader import load_benchmark

bench = load_benchmark("transfer")


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_micro_run_writes_results_and_a_rerun_reuses_them(tmp_path, monkeypatch):
    out = tmp_path / "results" / "transfer.json"
    argv = ["--config", "micro", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/transfer.py"] + argv)  # what announce() records
    bench.main(argv)
    written = json.loads(out.read_text())
    assert "--config micro" in written["command"]
    rows = written["results"]
    runs = [r for r in rows if r["part"] == "run"]
    # 4 tasks x 2 arms x 2 label counts, one seed
    assert sorted((r["task"], r["arm"], r["n_labels"]) for r in runs) == sorted(
        (t, a, n) for t in bench.TASKS for a in ("pretrained", "scratch") for n in (6, 12))
    for run in runs:
        spec = bench.TASKS[run["task"]]
        assert finite(run["metrics"][spec.metric], run["train_seconds"], run["eval_seconds"])
        assert run["n_train"] == run["n_labels"] and run["steps"] == 3 and not run["reused"]
        assert run["metrics"]["n_test"] == (8 if spec.domain == "lartpc" else 24)  # the fixed test sets
        if spec.higher_is_better:
            assert 0 <= run["metrics"][spec.metric] <= 1
        assert (run["label_leak"] is not None) == (run["task"] == "regression")
        assert not (run["label_leak"] or {}).get("detected")  # regression hides its target from the backbone
    # the pretrained arms really started from the two pretrainings, scratch from nothing
    for run in runs:
        settings = json.loads((Path(run["folder"]) / "metrics.json").read_text())
        assert (settings["checkpoint"] is None) == (run["arm"] == "scratch")
        if run["arm"] == "pretrained":
            assert f"pretrain/{bench.TASKS[run['task']].pretrained_from}/" in settings["checkpoint"]
    # segmentation_cross shares the segmentation scratch runs
    scratch = {(r["task"], r["n_labels"]): r["metrics"]["mean_f1"] for r in runs
               if r["arm"] == "scratch" and r["task"].startswith("segmentation")}
    assert scratch[("segmentation", 6)] == scratch[("segmentation_cross", 6)]

    # the no-network reference: a least-squares calibration on log visible energy per n and seed
    baseline = [r for r in rows if r["part"] == "baseline"]
    assert sorted((r["n_labels"], r["seed"]) for r in baseline) == [(6, 0), (12, 0)]
    assert all(finite(r["metrics"]["incident_energy/resolution"]) and r["metrics"]["n_test"] == 24 for r in baseline)
    assert "without a network" in out.with_suffix(".md").read_text()

    aggregates = [r for r in rows if r["part"] == "aggregate"]
    assert len(aggregates) == 16
    for row in aggregates:
        values = [r["metrics"][row["metric"]] for r in runs if (r["task"], r["arm"], r["n_labels"])
                  == (row["task"], row["arm"], row["n_labels"])]
        assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == 0.0 and row["n_seeds"] == 1

    checks = {r["task"]: r for r in rows if r["part"] == "target"}
    assert set(checks) == set(bench.TASKS)
    for task, check in checks.items():
        pretrained = next(a for a in aggregates if (a["task"], a["arm"], a["n_labels"]) == (task, "pretrained", 6))
        scratch = next(a for a in aggregates if (a["task"], a["arm"], a["n_labels"]) == (task, "scratch", 12))
        sign = 1 if bench.TASKS[task].higher_is_better else -1
        assert check["advantage"] == pytest.approx(sign * (pretrained["mean"] - scratch["mean"]))
        assert check["met"] == (check["advantage"] >= 0)  # one seed: no standard error
        assert isinstance(check["valid"], bool)
    summary, = [r for r in rows if r["part"] == "summary"]
    verdict = summary["verdict"]
    assert set(verdict) >= {"rule", "per_model", "models_meeting", "met"}
    (model, entry), = verdict["per_model"].items()
    assert entry["tasks_checked"] == ["pid", "regression", "segmentation"]
    assert entry["tasks_met"] == [t for t in entry["tasks_checked"] if checks[t]["met"] and checks[t]["valid"]]
    assert entry["met"] == (len(entry["tasks_met"]) >= 2) and verdict["met"] == entry["met"]
    assert finite(summary["total_wall_s"]) and summary["runs_fresh"] == 14 and summary["runs_reused"] == 0
    assert [p["source"] for p in summary["pretraining"]] == ["showers", "lartpc"]

    markdown = out.with_suffix(".md").read_text()
    assert "### Target" in markdown and "Verdict" in markdown
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0 and summary["plot"]
    else:
        assert summary["plot_skipped"]

    # a rerun finds everything done: nothing trained again, the same numbers; a stale leak verdict
    # in a record (as from an older, wrong check) is replaced by the check done again
    record_file = Path(next(r["folder"] for r in runs if r["task"] == "regression")) / bench.RUN_RECORD
    record = json.loads(record_file.read_text())
    record["result"]["label_leak"] = {"change": 99.0, "detected": True}
    record_file.write_text(json.dumps(record))
    again = bench.main(argv)
    summary2, = [r for r in again if r["part"] == "summary"]
    assert summary2["runs_fresh"] == 0 and summary2["runs_reused"] == 14
    assert all(p["reused"] for p in summary2["pretraining"])
    assert [r["metrics"] for r in again if r["part"] == "run"] == [r["metrics"] for r in runs]
    # the leak check is done again on the saved weights, by this code, not read from the record
    assert [r["label_leak"] for r in again if r["part"] == "run"] == [r["label_leak"] for r in runs]


def test_a_changed_setting_trains_again(tmp_path):
    """Only the runs whose settings changed are redone: more steps for the LArTPC fine-tunes."""
    argv = ["--config", "micro", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "t.json"),
            "--tasks", "segmentation", "--n-labels", "6", "--target-labels", "6", "6"]
    bench.main(argv)
    rows = bench.main(argv + ["--finetune-lartpc-steps", "4"])
    summary, = [r for r in rows if r["part"] == "summary"]
    assert summary["runs_fresh"] == 2 and summary["runs_reused"] == 0
    assert all(p["reused"] for p in summary["pretraining"])
    assert all(r["steps"] == 4 for r in rows if r["part"] == "run")


def test_steps_grow_with_the_labels_only_when_asked():
    config = bench.Config(n_labels=[100, 1000, 10_000], finetune_steps=100, finetune_lartpc_steps=50)
    pid, segmentation = bench.TASKS["pid"], bench.TASKS["segmentation"]
    assert [bench.finetune_steps(pid, n, config) for n in (100, 1000, 10_000)] == [100, 100, 100]
    config.label_step_exponent = 0.5
    assert [bench.finetune_steps(pid, n, config) for n in (100, 1000, 10_000)] == [100, 316, 1000]
    assert bench.finetune_steps(segmentation, 1000, config) == 158
    config.label_step_exponent = 1.0
    assert bench.finetune_steps(pid, 1000, config) == 1000


def test_the_target_geometry_must_be_unseen():
    with pytest.raises(SystemExit, match="would not be unseen"):
        bench.main(["--config", "micro", "--target-geometry", "calochallenge-ds2"])


class _Reads(torch.nn.Module):
    """A stand-in regression model: log visible energy, plus (if ``leaky``) the true log energy."""

    def __init__(self, leaky: bool):
        super().__init__()
        self.leaky = leaky
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch):
        visible = torch.zeros(int(batch.num_graphs)).index_add(0, batch.batch, batch.energy).log()
        out = self.scale * visible
        return (out + 0.01 * batch.incident_energy.log() if self.leaky else out)[:, None]


def test_the_leak_check_sees_a_model_that_reads_its_target():
    config = bench.Config(**bench.CONFIGS["micro"])
    events = bench.simulate("regression", 10, 0, config)
    clean = bench.target_leak(_Reads(False), events, "regression", "cpu")
    leaky = bench.target_leak(_Reads(True), events, "regression", "cpu")
    assert clean == {"change": 0.0, "detected": False}
    assert leaky["detected"] and leaky["change"] == pytest.approx(0.01 * math.log(2), rel=1e-4)
    assert bench.target_leak(_Reads(True), events, "classification", "cpu") is None
