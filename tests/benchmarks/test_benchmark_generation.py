"""benchmarks/generation.py at its micro size: every part runs, the JSON holds finite metrics for
each, and the markdown and plots are written."""
import json
import math
import sys
from pathlib import Path

import pytest

from tests.benchmark_loader import load_benchmark

bench = load_benchmark("generation")


def finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_micro_run_writes_finite_metrics_for_every_part(tmp_path, monkeypatch):
    out = tmp_path / "results" / "generation.json"
    argv = ["--config", "micro", "--workdir", str(tmp_path / "work"), "--out", str(out), "--batch-sizes", "1", "4",
            "1000", "--speed-cap-s", "1"]
    monkeypatch.setattr(sys, "argv", ["benchmarks/generation.py"] + argv)  # what announce() records
    bench.main(argv)
    written = json.loads(out.read_text())
    assert "--config micro" in written["command"] and written["machine"]["knn_backend"]
    rows = written["results"]
    by_part = {part: [r for r in rows if r["part"] == part] for part in ("quality", "adaptation", "speed", "summary")}

    generated, few_step, ideal, photons, scaled = by_part["quality"]
    assert photons["sample"].startswith("calibration: photons") and "x 1.05" in scaled["sample"]
    assert all(finite(r["auc_high_level"], r["fpd"]) and r["n_generated"] == 16 for r in (photons, scaled))
    assert any("high-level AUC" in key for key in by_part["summary"][0]["targets"])
    assert generated["sample"] == "generated, Heun 2 steps, raw energies" and ideal["sample"].startswith("ideal")
    assert few_step["sample"] == "generated, DPM-Solver++(2M) 2 steps" and few_step["network_calls"] == 2
    assert not generated["energy_calibrated"] and few_step["energy_calibrated"]
    for row in (generated, few_step, ideal):
        assert row["n_generated"] == row["n_reference"] == 16
        assert finite(row["auc_low_level"], row["auc_high_level"], row["separation_power_mean"], row["fpd"], row["kpd"])
        assert 0 <= row["auc_low_level"] <= 1 and 0 <= row["separation_power_mean"] <= 1
    assert finite(generated["train_seconds"], generated["final_loss"], generated["generate_seconds"])
    assert generated["plots"] and all(Path(p).is_file() for p in generated["plots"])

    arms = [r for r in by_part["adaptation"] if r["arm"] in ("pretrained", "scratch")]
    assert sorted((r["arm"], r["n"]) for r in arms) == [("pretrained", 6), ("pretrained", 12), ("scratch", 6),
                                                         ("scratch", 12)]
    assert all(finite(r["fpd"], r["auc_low_level"], r["separation_power_mean"]) for r in arms)
    assert all(r["train_steps"] == 2 for r in arms)
    ratios = {r["n"]: r for r in by_part["adaptation"] if r["arm"].startswith("ratio")}
    for n, ratio in ratios.items():
        fpd = {r["arm"]: r["fpd"] for r in arms if r["n"] == n}
        assert math.isclose(ratio["fpd_ratio"], fpd["pretrained"] / fpd["scratch"])
        assert ratio["meets_target"] == (ratio["fpd_ratio"] <= 0.7)
    assert sorted(ratios) == [6, 12]
    # the pretrained arm really started from the ds2 model: its run folder says so
    assert (tmp_path / "work" / "adaptation" / "pretrained_n6_seed0" / "checkpoints" / "last.ckpt").is_file()

    speed = by_part["speed"]
    assert {(r["sampler"], r["sampler_steps"], r["batch_requested"]) for r in speed} == {
        (name, s, b) for name, s in (("heun", 2), ("dpmpp2m", 1)) for b in (1, 4, 1000)}
    assert all(r["network_calls"] == (3 if r["sampler"] == "heun" else 1) for r in speed)
    for row in speed:
        if row["batch"]:  # measured, perhaps at a smaller batch than asked, and then said so
            assert finite(row["showers_per_s"], row["ms_per_shower"], row["deposit_ms_per_shower"])
            assert math.isclose(row["ms_per_shower"] * row["showers_per_s"], 1000.0)
            assert row["batch"] == row["batch_requested"] or "cap" in row["note"]
        else:
            assert row["note"].startswith("not measured")
    assert all(r["batch"] == r["batch_requested"] for r in speed if r["batch_requested"] < 1000)
    # 1000 showers cannot fit 1 s on a CPU: never silently reported as batch 1000
    big = [r for r in speed if r["batch_requested"] == 1000]
    assert all(r["batch"] != 1000 and "> cap 1 s" in r["note"] for r in big)
    assert any(r["batch"] and r["batch"] > 4 for r in big)  # measured at the largest batch that fits

    summary, = by_part["summary"]
    assert finite(summary["total_wall_s"]) and summary["total_wall_s"] > 0
    assert set(summary["part_seconds"]) >= {"quality", "adaptation", "speed"}
    assert all(Path(p).is_file() for p in summary["plots"]) and len(summary["plots"]) == 2
    markdown = out.with_suffix(".md").read_text()
    assert "### Quality" in markdown and "### Geometry adaptation" in markdown and "### Speed" in markdown


def test_sampler_specs_parse_and_bad_ones_fail_before_any_work():
    assert bench.Sampler.parse("dpmpp2m:8") == bench.Sampler("dpmpp2m", 8)
    assert bench.Sampler.parse("12") == bench.Sampler("heun", 12)
    assert bench.Sampler.parse("heun:20").fields() == {"sampler": "heun", "sampler_steps": 20, "network_calls": 39}
    raw = bench.Sampler.parse("heun:20:raw")
    assert raw == bench.Sampler("heun", 20, calibrated=False) and raw.options()["calibrate_energy"] is False
    assert bench.Sampler.parse("heun:20").options()["calibrate_energy"] is None  # where the model has the fit
    assert raw.slug == "heun20_raw" and raw.label == "Heun 20 steps, raw energies"
    for bad in ("euler:8", "heun:0", "heun:x", "dpmpp2m", "heun:8:cooked", "a:b:c:d"):
        with pytest.raises(ValueError, match="NAME:STEPS"):
            bench.Sampler.parse(bad)
    with pytest.raises(ValueError, match="NAME:STEPS"):
        bench.main(["--config", "micro", "--samplers", "heun:20", "dpm:4"])


def test_capped_batches_are_round_numbers_below_the_limit():
    assert [bench.nice_floor(v) for v in (0.5, 1, 7.9, 10, 99.9, 257.3, 12345)] == [0, 1, 7, 10, 99, 250, 12000]


def test_training_steps_from_a_time_budget(tmp_path):
    config = bench.Config(**{**bench.CONFIGS["micro"], "steps": 1000, "train_budget_s": 2.0})
    data = bench.showers("calochallenge-ds2", 12, 0, config)
    steps, per_step = bench.calibrated_steps(data, tmp_path / "calibration", config, calibration_steps=6)
    assert 0 < per_step < 2.0 and steps == min(1000, int(2.0 / per_step))
    config.train_budget_s = 1e6  # the budget never raises the steps above --steps
    assert bench.calibrated_steps(data, tmp_path / "again", config, calibration_steps=6)[0] == 1000


def test_an_adaptation_ratio_far_from_the_simulator_floor_is_flagged():
    ideal = {"part": "adaptation", "arm": "ideal: simulator, independent seed", "fpd": 100.0}
    def ratio(pretrained):
        return {"part": "adaptation", "arm": "ratio pretrained / scratch", "n": 100, "fpd_pretrained_mean": pretrained,
                "fpd_scratch_mean": pretrained * 10, "fpd_ratio": 0.1, "meets_target": True}
    key = f"FPD pretrained / scratch <= {bench.TARGET_FPD_RATIO} at n = 100"
    assert bench.targets([ideal, ratio(150.0)])[key] == "0.100: met"
    flagged = bench.targets([ideal, ratio(5e4)])[key]
    assert flagged.startswith("0.100: met; but") and "still 500x the simulator-vs-simulator floor" in flagged
