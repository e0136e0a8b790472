"""The command line: each sub-command on small inputs, through main(argv) as a user runs it."""
import json
import re

import h5py
import numpy as np
import pytest

from pcfm.cli.main import main
from pcfm.data import read_calochallenge, read_pilarnet_event


def test_geometries_lists_presets(capsys):
    assert main(["geometries"]) == 0
    out = capsys.readouterr().out
    assert "calochallenge-ds2" in out and "6480" in out and "lartpc-768" in out


def test_simulate_calo_writes_calochallenge_file(tmp_path, capsys):
    out = tmp_path / "e.h5"
    assert main(["simulate", "calo", "--geometry", "par04-scipb", "--n", "20", "--energy", "5000",
                 "--theta-deg", "60:90", "--seed", "1", "--out", str(out)]) == 0
    showers = read_calochallenge(out)
    assert len(showers) == 20 and showers.geometry == "par04-scipb"
    np.testing.assert_allclose(showers.incident_energies, 5000.0)
    assert np.all((showers.theta >= np.radians(60) - 1e-6) & (showers.theta <= np.radians(90) + 1e-6))
    assert "wrote" in capsys.readouterr().out


def test_simulate_lartpc_and_inspect(tmp_path, capsys):
    out = tmp_path / "lar.h5"
    assert main(["simulate", "lartpc", "--n", "3", "--seed", "2", "--out", str(out)]) == 0
    assert read_pilarnet_event(out, 2).version == 2
    assert main(["inspect", str(out)]) == 0
    assert "pilarnet, 3 events" in capsys.readouterr().out


def test_inspect_reports_bad_events_and_fails(tmp_path, capsys):
    path = tmp_path / "bad.h5"
    assert main(["simulate", "calo", "--n", "5", "--energy", "2000", "--out", str(path)]) == 0
    with h5py.File(path, "r+") as f:
        f["showers"][3, 10] = np.nan
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "5 events" in out and "1 bad" in out and "bad.h5: event 3" in out


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    assert main(["inspect", str(junk)]) == 2
    assert "junk.h5" in capsys.readouterr().err
    assert main(["simulate", "calo", "--geometry", "nope", "--n", "1", "--out", str(tmp_path / "x.h5")]) == 2
    assert "unknown geometry 'nope'" in capsys.readouterr().err


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    from pcfm.api import run_quickstart

    summary = run_quickstart(tmp_path, n_showers=100, n_lartpc=4, pretrain_steps=3)
    assert summary["calochallenge-ds2"]["events"] == 100 and summary["lartpc"]["events"] == 4
    assert summary["batches"] >= 1
    out = capsys.readouterr().out
    assert "[6/6]" in out and "all within their event: True" in out
    assert summary["pretrain"]["last_loss"] is not None and "checkpoint:" in out


def test_pretrain_from_yaml_with_overrides_then_generate(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("objective: diffusion\ngeometry: calochallenge-ds1-photons\nn_events: 48\nmodel: tiny\n"
                      "max_steps: 2\nbatch_points: 3000\naccelerator: cpu\nprogress: false\n")
    workdir = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), f"workdir={workdir}", "max_steps=3"]) == 0
    out = capsys.readouterr().out
    checkpoint = workdir / "checkpoints" / "last.ckpt"
    assert f"checkpoint: {checkpoint}" in out and checkpoint.is_file()
    generated = tmp_path / "gen.h5"
    assert main(["generate", "--checkpoint", str(checkpoint), "--geometry", "calochallenge-ds1-photons",
                 "--n", "4", "--energy", "5000", "--steps", "8", "--out", str(generated)]) == 0
    showers = read_calochallenge(generated)
    assert len(showers) == 4 and np.allclose(showers.incident_energies, 5000.0)


def test_pretrain_rejects_unknown_options(capsys):
    assert main(["pretrain", "max_stepz=3"]) == 2
    assert "unknown option(s) max_stepz" in capsys.readouterr().err


def test_inspect_a_file_whose_every_event_is_bad(tmp_path, capsys):
    path = tmp_path / "allbad.h5"
    assert main(["simulate", "calo", "--n", "3", "--energy", "2000", "--out", str(path)]) == 0
    with h5py.File(path, "r+") as f:
        f["showers"][:, 0] = np.nan
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "3 events, no good event; 3 bad" in out


def test_finetune_from_the_command_line(tmp_path, capsys):
    workdir = tmp_path / "ft"
    assert main(["finetune", "task=classification", "geometry=calochallenge-ds1-pions", "n_events=60",
                 "max_steps=2", "batch_points=3000", "accelerator=cpu", "progress=false",
                 f"workdir={workdir}"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and (workdir / "metrics.json").is_file()


def test_finetune_resumes_refuses_another_run_and_stops_early_from_the_command_line(tmp_path, capsys):
    workdir = tmp_path / "ft"
    run = ["finetune", "task=classification", "n_events=40", "max_steps=4", "batch_points=3000",
           "accelerator=cpu", "progress=false", "val_every_n_steps=1", "data_options={energy_range: [2000, 20000]}",
           f"workdir={workdir}"]
    assert main([*run, "--patience", "1"]) == 0
    first = capsys.readouterr().out
    assert "tested " in first and "validation loss" in first
    assert main([*run, "--patience", "1"]) == 0  # finished: tested again, not trained
    again = capsys.readouterr().out
    assert re.search(r"trained \d+ of 4 steps.*; resumed from step \d+", again)
    assert first.split("\n", 1)[1] == again.split("\n", 1)[1]  # the same tested weights and metrics
    assert main(run) == 2  # no patience now: another run
    assert "its patience is 1, not None; pass resume=False" in capsys.readouterr().err
    assert main([*run, "--no-resume"]) == 0
    assert "trained 4 of 4 steps\n" in capsys.readouterr().out


def test_evaluate_two_simulated_samples(tmp_path, capsys):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, seed in ((a, "1"), (b, "2")):
        assert main(["simulate", "calo", "--geometry", "calochallenge-ds1-photons", "--particle", "photon",
                     "--n", "300", "--energy", "1000:100000", "--seed", seed, "--out", str(path)]) == 0
    report = tmp_path / "report.json"
    assert main(["evaluate", str(a), str(b), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "separation power: mean" in out and "classifier AUC (high-level)" in out
    assert report.is_file() and report.with_suffix(".md").is_file()


def test_evaluate_clip_negative_and_keep_empty(tmp_path, capsys, monkeypatch):
    """A generator's file with a -1e-6 MeV cell (event 2) and an all-zero shower (event 4), which the
    CaloChallenge evaluation accepts: refused by default, naming the option; read with both options."""
    monkeypatch.delenv("PCFM_TRACEBACK", raising=False)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, seed in ((a, "1"), (b, "2")):
        assert main(["simulate", "calo", "--geometry", "calochallenge-ds1-photons", "--particle", "photon",
                     "--n", "40", "--energy", "1000:100000", "--seed", seed, "--out", str(path)]) == 0
    with h5py.File(a, "r+") as f:
        f["showers"][2, 5] = -1e-6
        f["showers"][4] = np.zeros(f["showers"].shape[1], np.float32)
    capsys.readouterr()
    assert main(["evaluate", str(a), str(b), "--no-classifier"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pcfm evaluate: error: {a}: event 2: negative cell energy -1e-06 MeV in cell 5")
    assert "--clip-negative" in err and err.count("\n") == 1
    assert main(["evaluate", str(a), str(b), "--no-classifier", "--clip-negative"]) == 2
    err = capsys.readouterr().err
    assert f"{a}: event 4: empty shower: all 368 cells are zero" in err and "--keep-empty" in err
    report = tmp_path / "report.json"
    assert main(["evaluate", str(a), str(b), "--no-classifier", "--clip-negative", "--keep-empty",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "generated: 1 negative cells set to 0 (-1e-06 MeV), 1 empty showers kept" in out
    assert "JetNet definitions (x 10^3): FPD" in out and "not comparable with published values" in out
    inputs = json.loads(report.read_text())["inputs"]
    assert inputs["generated"]["negative_cells"] == 1 and inputs["generated"]["empty_showers"] == 1
    assert inputs["clip_negative"] and inputs["keep_empty"]


# --- user mistakes: one line on stderr, exit code 2, in every sub-command -----------------------
MISTAKES = [
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "0"], "--energy: values must be positive"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "nan"], "--energy: values must be positive"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "inf"], "--energy: values must be positive"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy=-5"], "--energy: values must be positive"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "0:1e4"], "with LO <= HI, got '0:1e4'"),  # log 0
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "1e4:10"], "with LO <= HI, got '1e4:10'"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "lots"], "--energy: expected a number or a range"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--n", "0"], "--n must be at least 1, got 0"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--steps", "0"], "--steps must be at least 1"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--theta-deg", "200"], "--theta-deg: angles must lie in (0, 180)"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt", "--energy", "2e7"], "energies: incident energies must be"),
    (["generate", "--checkpoint", "{tmp}/none.ckpt"], "none.ckpt"),
    (["simulate", "calo", "--energy=-5", "--out", "{tmp}/x.h5"], "--energy: values must be positive"),
    (["simulate", "calo", "--energy", "1e8", "--out", "{tmp}/x.h5"], "energy: energies must be positive and finite"),
    (["simulate", "calo", "--n", "0", "--out", "{tmp}/x.h5"], "--n must be at least 1"),
    (["simulate", "calo", "--theta-deg", "0:90", "--out", "{tmp}/x.h5"], "--theta-deg: angles must lie in (0, 180)"),
    (["simulate", "calo", "--particle", "muon", "--out", "{tmp}/x.h5"], "unknown particle 'muon'"),
    (["simulate", "lartpc", "--n", "0", "--out", "{tmp}/x.h5"], "--n must be at least 1"),
    (["simulate", "lartpc", "--points", "500:100", "--out", "{tmp}/x.h5"], "--points: values must be positive"),
    (["simulate", "lartpc", "--points", "500", "--out", "{tmp}/x.h5"], "--points takes a range LO:HI"),
    (["pretrain", "model=huge", "workdir={tmp}/run"], "unknown backbone preset 'huge'"),
    (["finetune", "task=foo", "workdir={tmp}/run"], "unknown task 'foo'"),
    (["inspect", "{tmp}/none.h5"], "none.h5: no such file"),
    (["evaluate", "{tmp}/none.h5", "{tmp}/none.h5"], "none.h5: no such file"),
    (["quickstart", "--steps", "0", "--workdir", "{tmp}/q"], "--steps must be at least 1"),
]


@pytest.mark.parametrize("argv, problem", MISTAKES, ids=[" ".join(a for a in argv if "{tmp}" not in a)
                                                           for argv, _ in MISTAKES])
def test_user_mistakes_are_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, argv, problem):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PCFM_TRACEBACK", raising=False)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    command = " ".join(argv[:2]) if argv[0] == "simulate" else argv[0]
    assert captured.err.startswith(f"pcfm {command}: error: ") and captured.err.count("\n") == 1, captured.err
    assert problem in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "x.h5").exists()


def test_inspect_fails_on_a_file_without_events_and_names_it(tmp_path, capsys):
    from pcfm.data import write_pilarnet

    path = tmp_path / "none.h5"
    write_pilarnet(path, [])
    assert main(["inspect", str(path)]) == 2
    assert f"pcfm inspect: error: {path}: holds no events" in capsys.readouterr().err


def test_inspect_reports_values_out_of_range(tmp_path, capsys):
    path = tmp_path / "absurd.h5"
    assert main(["simulate", "calo", "--n", "4", "--energy", "2000", "--out", str(path)]) == 0
    with h5py.File(path, "r+") as f:
        f["showers"][2, 7] = 1e30
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "4 events" in out and "1 bad" in out
    assert f"{path}: event 2: cell energy 1e+30 MeV in cell 7 is out of range" in out


def test_evaluate_refuses_files_of_different_geometries_unless_told(tmp_path, capsys):
    files = []
    for geometry, seed in (("calochallenge-ds2", "1"), ("par04-scipb", "2")):
        files.append(str(tmp_path / f"{geometry}.h5"))
        assert main(["simulate", "calo", "--geometry", geometry, "--n", "6", "--energy", "1000:10000",
                     "--seed", seed, "--out", files[-1]]) == 0
    capsys.readouterr()
    assert main(["evaluate", *files, "--no-classifier"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pcfm evaluate: error: the generated showers") and err.count("\n") == 1
    assert f"({files[0]}) name geometry 'calochallenge-ds2'" in err and f"({files[1]}) name 'par04-scipb'" in err
    assert "--allow-geometry-mismatch" in err
    assert main(["evaluate", *files, "--no-classifier", "--geometry", "par04-scipb"]) == 2
    assert "geometry 'par04-scipb' contradicts the generated showers" in capsys.readouterr().err
    assert main(["evaluate", *files, "--no-classifier", "--allow-geometry-mismatch"]) == 0
    out = capsys.readouterr().out
    assert "both evaluated as 'par04-scipb'" in out and "FPD" in out
