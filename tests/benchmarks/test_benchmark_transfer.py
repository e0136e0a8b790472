"""benchmarks/transfer.py at its micro size: every task, arm and reference runs on the same labels,
the learning rate is chosen on validation, the summary holds what issue 12 asks for and follows
from the runs, coverage is reported for both detector families, and a rerun reuses the runs."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from tests.benchmark_loader import load_benchmark

bench = load_benchmark("transfer")

TASKS = ["pid", "pion_energy", "segmentation", "gamma_pi0"]


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    pytest.importorskip("sklearn", reason="the references need the bench extra")
    root = tmp_path_factory.mktemp("transfer")
    out = root / "results" / "transfer.json"
    argv = ["--config", "micro", "--workdir", str(root / "work"), "--out", str(out), "--tasks", *TASKS]
    saved = sys.argv
    sys.argv = ["benchmarks/transfer.py"] + argv  # what announce() records
    try:
        rows = bench.main(argv)
    finally:
        sys.argv = saved
    return argv, out, rows


def test_every_arm_and_reference_runs_on_the_same_labels(micro):
    _, out, rows = micro
    written = json.loads(out.read_text())
    assert "--config micro" in written["command"] and written["results"] == json.loads(json.dumps(rows))
    runs = [r for r in rows if r["part"] == "run"]
    config = bench.Config(**bench.CONFIGS["micro"])
    for task in TASKS:
        mine = [r for r in runs if r["task"] == task]
        counts = bench.label_counts(task, config)
        assert counts == ([6, 9, 12] if task != "gamma_pi0" else [6, 9, 12])
        for n in counts:
            seeds = [0] if n == 9 else [0, 1]
            arms = {"reference", "scratch", "pretrained"} | ({"linear"} if n == 6 else set())
            assert {(r["arm"], r["seed"]) for r in mine if r["n_labels"] == n} == {(a, s) for a in arms for s in seeds}
            for seed in seeds:
                same = {r["train_index_digest"] for r in mine if (r["n_labels"], r["seed"]) == (n, seed)}
                assert len(same) == 1, (task, n, seed)  # every arm and the references: the same labels
        for run in mine:
            spec = bench.TASKS[task]
            assert finite(run["metrics"][spec.metric], run["seconds"]) and run["n_train"] == run["n_labels"]
            expected_test = {"lartpc": 8, "gamma_pi0": 8}.get(spec.domain, 24)
            assert run["metrics"]["n_test"] == expected_test
            if run["arm"] != "reference":
                assert run["steps"] <= bench.steps_for(run["n_labels"], config, task) and run["val_loss"] is not None
                assert (run["label_leak"] is not None) == (spec.finetune_task == "regression")
                assert not (run["label_leak"] or {}).get("detected")  # the target is hidden from the backbone
            else:
                assert {"best"} < set(run["models"]) and run["metrics"] == run["models"]["best"]["metrics"]
    # gamma_pi0 seeds are folds: their test sets differ, simulated tasks share theirs
    gamma = {r["seed"]: r["metrics"]["accuracy"] for r in runs if r["task"] == "gamma_pi0" and r["arm"] == "reference"
             and r["n_labels"] == 6}
    assert len(gamma) == 2


def test_learning_rates_are_chosen_on_validation(micro):
    _, _, rows = micro
    selection = [r for r in rows if r["part"] == "lr_selection"]
    runs = [r for r in rows if r["part"] == "run"]
    for task in TASKS:
        for arm in ("scratch", "pretrained"):
            tried = [r for r in selection if (r["task"], r["arm"]) == (task, arm)]
            assert sorted(r["lr"] for r in tried) == [1e-3, 3e-3]
            chosen, = [r for r in tried if r["chosen"]]
            assert chosen["val_loss"] == min(r["val_loss"] for r in tried)
            assert {r["lr"] for r in runs if (r["task"], r["arm"]) == (task, arm)} == {chosen["lr"]}
        assert {r["lr"] for r in runs if (r["task"], r["arm"]) == (task, "linear")} == {1e-2}


def test_the_summary_follows_from_the_runs(micro):
    _, out, rows = micro
    summary, = [r for r in rows if r["part"] == "summary"]
    runs = [r for r in rows if r["part"] == "run"]
    tasks = summary["summary"]["tasks"]
    assert list(tasks) == TASKS
    for task, record in tasks.items():
        spec = bench.TASKS[task]
        assert record["metric"] == spec.metric and record["higher_is_better"] == spec.higher_is_better
        for key, arm, which in bench.SUMMARY_KEYS:
            n = {"low": 6, "high": 12}[which]
            values = [r["metrics"][spec.metric] for r in runs if (r["task"], r["arm"], r["n_labels"]) == (task, arm, n)]
            if arm == "linear" and n == 12:
                continue
            entry = record[key]
            assert entry["n_seeds"] == 2 and entry["mean"] == pytest.approx(np.mean(values))
            assert entry["standard_error"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
        check = record["checks"]["scratch@1000 >= reference@1000"]
        sign = 1 if spec.higher_is_better else -1
        assert check["advantage"] == pytest.approx(sign * (record["scratch@1000"]["mean"]
                                                           - record["reference@1000"]["mean"]))
        assert check["met"] == (check["advantage"] >= -check["standard_error"])
    targets = {t["target"]: t for t in summary["summary"]["targets"]}
    transfer = targets["pretrained@100 >= scratch@1000 on at least two tasks"]
    assert transfer["tasks"] == [t for t in TASKS if tasks[t]["checks"]["pretrained@100 >= scratch@1000"]["met"]]
    markdown = out.with_suffix(".md").read_text()
    assert "### Summary" in markdown and "Token coverage" in markdown and "pretrained@100" in markdown


def test_coverage_is_reported_for_both_detector_families(micro):
    _, _, rows = micro
    coverage = {r["events"]: r for r in rows if r["part"] == "coverage"}
    assert len(coverage) == 4  # ds2, par04, LArTPC (simulated) and the Geant4 showers of gamma_pi0
    assert any("lartpc" in name for name in coverage) and any("scipb" in name for name in coverage)
    assert all(r["min"] >= 0.99 and r["n_events"] > 0 for r in coverage.values())


def test_a_rerun_reuses_every_run_and_a_changed_setting_trains_again(micro, tmp_path):
    argv, _, rows = micro
    again = bench.main(argv)
    summary, = [r for r in again if r["part"] == "summary"]
    assert summary["runs_fresh"] == 0 and summary["runs_reused"] > 0
    assert [r["metrics"] for r in again if r["part"] == "run"] == [r["metrics"] for r in rows if r["part"] == "run"]
    changed = bench.main(argv[:argv.index("--tasks")] + ["--tasks", "pid", "--arms", "scratch", "--steps-at",
                                                         json.dumps({"6": 5, "9": 4, "12": 6})])
    runs = [r for r in changed if r["part"] == "run" and r["n_labels"] == 6]
    fresh = [r for r in runs if not r["reused"]]
    assert {r["arm"] for r in fresh} == {"scratch"} and all(r["reused"] for r in runs if r["arm"] == "reference")


def test_gamma_pi0_folds_partition_the_showers():
    tests = []
    for fold in range(bench.GAMMA_PI0_FOLDS):
        pool, val, test = bench.gamma_pi0_fold(1000, fold)
        assert (len(pool), len(val), len(test)) == (600, 200, 200)
        assert not (set(pool) & set(val)) and not (set(pool) & set(test)) and not (set(val) & set(test))
        tests.append(test)
    assert sorted(np.concatenate(tests).tolist()) == list(range(1000))
    assert bench.gamma_pi0_pool_size(bench.Config()) == 600


def test_steps_and_arms_by_label_count():
    config = bench.Config(steps_at={"100": 300, "1000": 600}, arm_labels={"linear": [100]})
    assert [bench.steps_for(n, config) for n in (50, 100, 300, 1000, 3000)] == [300, 300, 300, 600, 600]
    # a task's own table replaces steps_at; early stopping waits for half the budget by default
    tables = bench.Config(steps_at={"100": 300}, task_steps_at={"gamma_pi0": {"100": 800, "600": 1000}})
    assert [bench.steps_for(n, tables, "gamma_pi0") for n in (100, 300, 600)] == [800, 800, 1000]
    assert bench.steps_for(600, tables, "pid") == 300
    assert bench.min_steps_for(bench.Job("gamma_pi0", "scratch", 600, 1), tables) == 500
    assert bench.arm_runs_at("pid", "linear", 100, config) and not bench.arm_runs_at("pid", "linear", 1000, config)
    assert bench.arm_runs_at("pid", "scratch", 3000, config)
    assert bench.label_counts("gamma_pi0", bench.Config()) == [100, 300, 600]


def test_runs_from_before_min_steps_are_reused_only_when_they_trained_every_step():
    settings = {"max_steps": 300, "patience": 4, "min_steps": 150}
    old = {"max_steps": 300, "patience": 4}
    assert bench.same_run({"settings": settings, "result": {"stopped_early": True}}, settings)
    assert bench.same_run({"settings": old, "result": {"stopped_early": False}}, settings)
    assert not bench.same_run({"settings": old, "result": {"stopped_early": True}}, settings)
    assert not bench.same_run({"settings": {**old, "max_steps": 200}, "result": {"stopped_early": False}}, settings)


def test_compare_uses_the_direction_and_the_standard_error():
    high = {"mean": 0.9, "standard_error": 0.01}
    low = {"mean": 0.88, "standard_error": 0.01}
    assert bench.compare(high, low, True)["met"] and not bench.compare(low, high, True)["met"]
    assert bench.compare(low, high, False)["met"]  # lower is better for resolutions
    close = {"mean": 0.895, "standard_error": 0.01}
    assert bench.compare(close, high, True)["met"]  # within one standard error of the difference
    assert bench.compare(None, high, True)["met"] is None


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
    events = bench.simulate("electron_energy", 10, 0, config)
    assert bench.target_leak(_Reads(False), events) == {"change": 0.0, "detected": False}
    leaky = bench.target_leak(_Reads(True), events)
    assert leaky["detected"] and leaky["change"] == pytest.approx(0.01 * math.log(2), rel=1e-4)
