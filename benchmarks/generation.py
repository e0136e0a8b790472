"""Shower generation with the point-diffusion model: quality, geometry adaptation and speed.

Why one module of this length: the quality and adaptation parts share the simulated sets, the
seeds and the training and evaluation helpers, and the command line runs them in order; split
apart, one protocol would be read across files.

Three parts, selectable with ``--parts``:

* quality: pretrain objective "diffusion" on simulated ``calochallenge-ds2`` electrons (the
  simulator's default energies: log-uniform 1 GeV - 1 TeV, normal incidence), generate one
  shower per incident energy of an independently simulated reference set (another seed), deposit
  the points on the ds2 cells, and compare with :func:`pcfm.evaluate`: low- and
  high-level classifier AUC, separation power (mean and max over features), FPD and KPD. A
  second independent simulator sample against the same reference is the "ideal" row (AUC about
  0.5; its FPD is the floor that finite samples give). One generated row per sampler of
  ``--samplers``; showers get :func:`pcfm.generate`'s energy calibration unless the
  sampler is marked ``:raw`` (the default set has one raw row to show what it changes).
* adaptation: the quality model (ds2) adapted to an unseen geometry (``--target-geometry``,
  default ``par04-scipb``) with n in ``--adapt-n`` target showers: (a) ``pcfm.pretrain(...,
  init_from=<ds2 checkpoint>)`` for k steps, (b) the same backbone from scratch, the same n
  showers, the same k steps, learning rate and schedule. Both are judged against an independent
  target reference set: FPD (primary), AUC, separation power; the ratio FPD_pretrained /
  FPD_scratch (means over ``--adapt-seeds``) is reported against the target ratio <= 0.7.
* speed: showers per second at batch sizes ``--batch-sizes`` (1, 100, 10000) for each sampler
  of ``--speed-samplers`` (generate's default, Heun 20 steps, and DPM-Solver++(2M) at 20 and 8),
  on the CPU and, when there is one, the GPU (also under bf16 autocast).
  Time is :func:`pcfm.generate`'s wall time (sampling, deposition, conversion; not the
  checkpoint load) after a warm-up call; the deposition share is measured apart by depositing
  the generated points again. A batch that would run longer than ``--speed-cap-s`` (projected
  from the previous batch size) is measured at the largest batch that fits, and the row says so;
  a batch that runs out of GPU memory is halved until it fits, and the row says so. No
  distilled sampler exists yet: every row is a deterministic ODE solver on the trained model.

A sampler is given as ``NAME:STEPS`` (``heun:20``, ``dpmpp2m:8``; a bare number means Heun);
rows report its network calls (Heun ``2 steps - 1``, DPM-Solver++(2M) ``steps``).

Targets (issue 6, on an H100): low-level AUC < 0.70 on ds2; at most 2 ms per shower at batch
100; adaptation with 100 showers: FPD ratio <= 0.7. CPU configurations test the script and give
CPU numbers; they are not where the targets are meant to be met.

    python benchmarks/generation.py [--config cpu|gpu|micro] [--parts quality adaptation speed]
        [--model M] [--steps N] [--n-train N] [--n-reference N] [--samplers heun:20 dpmpp2m:8 ...]
        [--adapt-n N ...] [--adapt-steps K] [--adapt-seeds S ...] [--target-geometry G]
        [--speed-samplers heun:20 ...] [--batch-sizes B ...] [--speed-cap-s T] [--threads T]
        [--workdir DIR] [--out FILE.json]

Output: the JSON (default benchmarks/results/generation.json for ``--config cpu``,
generation_<config>.json otherwise), a markdown summary beside it (.md) and PNG plots in
``<json stem>_plots/`` (matplotlib). Models, simulated sets and evaluation reports go to
``--workdir`` (default ``pcfm_runs/generation_<config>``); a rerun with the same settings reuses
the quality model found there instead of training it again. Results are rewritten after every
part.

This file holds the quality and adaptation parts and the command line; the sizes, presets and
samplers are in ``generation_config.py``, the speed part in ``generation_speed.py``, the plots,
the report and the target checks in ``generation_report.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch

from _common import (RESULTS_DIR, add_config_options, announce, apply_config_options, as_json, device_for, fmt,
                     log, parse_json_or_text, write_results)
from generation_config import CONFIGS, REPEAT_BELOW_S, SOURCE_GEOMETRY, TARGET_FPD_RATIO, Config, Sampler
from generation_report import make_plots, report, targets
from generation_speed import run_speed
from pcfm.api import pretrain
from pcfm.data import ShowerDataset
from pcfm.io import atomic_path
from pcfm.engine.training import checkpoint_path
from pcfm.api import evaluate
from pcfm.api import generate
from pcfm.nn import count_parameters
from pcfm.sim import simulate_showers
from pcfm.tasks.pretrain import PretrainModule
# read as generation.X by the tests:
from generation_speed import nice_floor  # noqa: F401

PARTS = ("quality", "adaptation", "speed")
#: Seeds of the simulated sets: training, reference and "ideal" samples never share one.
SEED_TRAIN, SEED_REFERENCE, SEED_IDEAL, SEED_CALIBRATION = 1, 2, 3, 4
SEED_TARGET_REFERENCE, SEED_TARGET_IDEAL, SEED_TARGET_TRAIN = 12, 13, 100


def knn_backend() -> str:
    return "torch_cluster" if importlib.util.find_spec("torch_cluster") else "torch (torch-cluster not installed)"


def showers(geometry: str, n: int, seed: int, config: Config):
    return simulate_showers(geometry, n, particle="electron", energy=tuple(config.energy_range), seed=seed)


def eval_metrics(result: dict) -> dict:
    """The numbers of a :func:`pcfm.evaluate` result that go into the tables."""
    classifier = result.get("classifier") or {}
    auc = lambda level: classifier[level]["auc"] if classifier.get(level) else None  # noqa: E731
    return {"auc_low_level": auc("low_level"), "auc_high_level": auc("high_level"),
            "separation_power_mean": result["separation_power"]["mean"],
            "separation_power_max": result["separation_power"]["max"],
            "separation_power_max_feature": result["separation_power"]["max_feature"],
            "fpd": result["fpd"], "kpd": result["kpd"], "kpd_std": result["kpd_std"],
            "n_generated": result["n_generated"], "n_reference": result["n_reference"]}


def train(data, workdir: Path, config: Config, *, max_steps: int, batch_points: int, seed: int, model=None,
          init_from=None, resume: bool = False) -> tuple[Any, dict]:
    """One diffusion pretraining run; its result and a summary (time, losses)."""
    start = time.perf_counter()
    result = pretrain("diffusion", data=ShowerDataset(data), model=model, max_steps=max_steps,
                      batch_points=batch_points, lr=config.lr, val_fraction=0.0, workdir=workdir, resume=resume,
                      accelerator=config.accelerator, devices=1, seed=seed, progress=False,
                      log_every_n_steps=max(1, min(50, max_steps // 20)),
                      checkpoint_every_n_steps=max(1, max_steps // 4), init_from=init_from,
                      objective_options={"diffusion": {"energy_transform": config.energy_transform}}
                      if config.energy_transform else None)
    seconds = time.perf_counter() - start
    losses = [row["train/loss"] for row in result.history if "train/loss" in row]
    tail = losses[-max(1, len(losses) // 10):]
    return result, {"train_seconds": round(seconds, 2), "train_steps": max_steps,
                    "seconds_per_step": round(seconds / max(1, max_steps), 4),
                    "first_loss": losses[0] if losses else None,
                    "final_loss": float(np.mean(tail)) if tail else None}


# ----------------------------------------------------------------------------- quality


class StepClock(L.Callback):
    """Records when every training step ends."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter())


def calibrated_steps(data, folder: Path, config: Config, calibration_steps: int = 30) -> tuple[int, float]:
    """Training steps that fit ``config.train_budget_s`` (at most ``config.steps``), from the
    median step time of a short run (its first third, with warm-up, left out)."""
    clock = StepClock()
    pretrain("diffusion", data=ShowerDataset(data), model=config.model, max_steps=calibration_steps,
             batch_points=config.batch_points, lr=config.lr, val_fraction=0.0, workdir=folder, resume=False,
             accelerator=config.accelerator, devices=1, progress=False, callbacks=[clock],
             checkpoint_every_n_steps=calibration_steps, log_every_n_steps=calibration_steps,
             objective_options={"diffusion": {"energy_transform": config.energy_transform}}
             if config.energy_transform else None)
    per_step = float(np.median(np.diff(clock.times[calibration_steps // 3:])))
    return max(1, min(config.steps, int(config.train_budget_s / per_step))), per_step


def train_source_model(config: Config, workdir: Path) -> tuple[Path, dict]:
    """The ds2 model, reused from ``workdir`` when it was trained there with the same settings."""
    folder = workdir / "quality" / "model"
    settings = {key: getattr(config, key) for key in ("model", "steps", "train_budget_s", "batch_points", "lr",
                                                      "n_train", "energy_range", "energy_transform", "accelerator")}
    settings = as_json(settings)  # tuples as lists, as read back
    settings_file = folder / "settings.json"
    stored = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    reuse = stored.get("settings") == settings
    # A record without "done" predates it and was only written after training.
    if reuse and stored.get("done", True) and checkpoint_path(folder).is_file():
        summary = {**stored["summary"], "reused_from": str(folder)}
        summary.setdefault("calibration", stored.get("calibration"))
        log(f"[quality] reused the diffusion model in {folder}: {summary['train_seconds']:.0f} s "
            f"({summary['seconds_per_step']:.3f} s/step); loss {fmt(summary['first_loss'])} -> "
            f"{fmt(summary['final_loss'])}")
        return checkpoint_path(folder), summary
    log(f"[quality] simulating {config.n_train} {SOURCE_GEOMETRY} electrons for training (seed {SEED_TRAIN})")
    data = showers(SOURCE_GEOMETRY, config.n_train, SEED_TRAIN, config)
    steps, calibration = config.steps, None
    if reuse:  # an interrupted run with these settings: finish it
        steps, calibration = stored["steps"], stored.get("calibration")
    elif config.train_budget_s:
        steps, per_step = calibrated_steps(data, workdir / "quality" / "calibration", config)
        calibration = {"seconds_per_step": per_step, "budget_s": config.train_budget_s, "steps": steps}
        log(f"[quality] calibration: {per_step:.3f} s/step -> {steps} steps fit {config.train_budget_s:g} s")
    log(f"[quality] {'finishing' if reuse else 'training'} the diffusion model ({config.model}, "
        f"{steps} steps, batches of {config.batch_points} points) in {folder}")
    if not reuse and folder.exists():
        shutil.rmtree(folder)
    record = {"settings": settings, "steps": steps, "calibration": calibration}

    def write_record(**fields) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(settings_file) as tmp:
            tmp.write_text(json.dumps({**record, **fields}))

    write_record(done=False)  # written first, so an interrupted run is resumed, not trained again
    result, summary = train(data, folder, config, max_steps=steps, batch_points=config.batch_points,
                            seed=0, model=config.model, resume=reuse)
    summary["calibration"] = calibration
    summary["parameters"] = count_parameters(result.module)
    write_record(done=True, summary=summary)
    log(f"[quality] trained: {summary['train_seconds']:.0f} s ({summary['seconds_per_step']:.3f} s/step); "
        f"loss {fmt(summary['first_loss'])} -> {fmt(summary['final_loss'])}")
    return result.checkpoint_path, summary


def run_quality(config: Config, checkpoint: Path, train_summary: dict, workdir: Path, plots: Path) -> list[dict]:
    device = device_for(config.accelerator)
    log(f"[quality] simulating the reference ({config.n_reference}, seed {SEED_REFERENCE}) and ideal "
        f"({config.n_reference}, seed {SEED_IDEAL}) samples")
    reference = showers(SOURCE_GEOMETRY, config.n_reference, SEED_REFERENCE, config)
    ideal = showers(SOURCE_GEOMETRY, config.n_reference, SEED_IDEAL, config)
    rows = []
    for sampler in map(Sampler.parse, config.samplers):
        log(f"[quality] generating {config.n_reference} showers, {sampler.label}, on {device}")
        generated = generate(checkpoint, SOURCE_GEOMETRY, reference.incident_energies, theta=reference.theta,
                             **sampler.options(), batch_size=config.gen_batch_size, device=device, seed=0,
                             progress=True)
        deposited = generated.showers.showers.sum(1)
        outside = generated.energy_outside / np.maximum(deposited + generated.energy_outside, 1e-9)
        log(f"[quality] generated in {generated.seconds:.1f} s; evaluating")
        result = evaluate(generated.showers, reference, SOURCE_GEOMETRY, classifier=config.classifier,
                          plots_dir=plots / f"quality_{sampler.slug}",
                          report_path=workdir / "quality" / f"evaluation_{sampler.slug}.json")
        rows.append({"part": "quality", "sample": f"generated, {sampler.label}", **sampler.fields(),
                     "energy_calibrated": generated.energy_calibrated,
                     "generate_seconds": round(generated.seconds, 2),
                     "energy_outside_fraction": float(np.mean(outside)), **train_summary, **eval_metrics(result),
                     "plots": result["plots"]})
        log(f"[quality] {rows[-1]['sample']}: " + summary_line(rows[-1]))
    log("[quality] evaluating the ideal row (simulator vs simulator)")
    result = evaluate(ideal, reference, SOURCE_GEOMETRY, classifier=config.classifier,
                      report_path=workdir / "quality" / "evaluation_ideal.json")
    rows.append({"part": "quality", "sample": "ideal: simulator, independent seed", **eval_metrics(result)})
    log("[quality] ideal: " + summary_line(rows[-1]))
    if config.calibration:
        rows += calibration_rows(reference, ideal, config, workdir)
    return rows


def calibration_rows(reference, ideal, config: Config, workdir: Path) -> list[dict]:
    """What the tests can detect, against the same reference: photons instead of electrons (a
    shower starting later, the same energy scale), and the independent electron sample with every
    cell energy x 1.05 (a 5 % energy-scale error). A metric that cannot tell these from the
    reference cannot vouch for a generator either."""
    photons = simulate_showers(SOURCE_GEOMETRY, config.n_reference, particle="photon",
                               energy=reference.incident_energies, seed=SEED_CALIBRATION)
    scaled = dataclasses.replace(ideal, showers=ideal.showers * 1.05)
    rows = []
    for label, sample, slug in (("calibration: photons vs the electron reference", photons, "photons"),
                                ("calibration: ideal sample, cell energies x 1.05", scaled, "scale105")):
        log(f"[quality] evaluating {label}")
        result = evaluate(sample, reference, SOURCE_GEOMETRY, classifier=config.classifier,
                          report_path=workdir / "quality" / f"evaluation_calibration_{slug}.json")
        rows.append({"part": "quality", "sample": label, **eval_metrics(result)})
        log(f"[quality] {label}: " + summary_line(rows[-1]))
    return rows


def summary_line(row: dict) -> str:
    parts = []
    for key, name in (("auc_low_level", "AUC low"), ("auc_high_level", "AUC high"),
                      ("separation_power_mean", "sep. power"), ("fpd", "FPD"), ("kpd", "KPD")):
        if row.get(key) is not None:
            parts.append(f"{name} {row[key]:.4g}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- adaptation


def run_adaptation(config: Config, checkpoint: Path, workdir: Path) -> list[dict]:
    target, device = config.target_geometry, device_for(config.accelerator)
    adapt_sampler = Sampler.parse(config.adapt_sampler)
    source_backbone = PretrainModule.load_from_checkpoint(checkpoint).hparams["backbone"]
    log(f"[adaptation] simulating the {target} reference ({config.n_target_reference}, seed "
        f"{SEED_TARGET_REFERENCE}) and ideal samples")
    reference = showers(target, config.n_target_reference, SEED_TARGET_REFERENCE, config)
    ideal = showers(target, config.n_target_reference, SEED_TARGET_IDEAL, config)
    folder = workdir / "adaptation"
    result = evaluate(ideal, reference, target, classifier=config.classifier,
                      report_path=folder / "evaluation_ideal.json")
    rows = [{"part": "adaptation", "arm": "ideal: simulator, independent seed", "n": None, "seed": None,
             **eval_metrics(result)}]
    for seed in config.adapt_seeds:
        pool = showers(target, max(config.adapt_n), SEED_TARGET_TRAIN + seed, config)
        for n in config.adapt_n:
            data = pool.subset(np.arange(n))  # nested: the 100 showers are among the 1000
            for arm in ("pretrained", "scratch"):
                log(f"[adaptation] seed {seed}, n {n}, {arm}: {config.adapt_steps} steps")
                init = checkpoint if arm == "pretrained" else None
                trained, summary = train(data, folder / f"{arm}_n{n}_seed{seed}", config,
                                         max_steps=config.adapt_steps, batch_points=config.adapt_batch_points,
                                         seed=seed, model=None if init else source_backbone, init_from=init)
                generated = generate(trained.module, target, reference.incident_energies, theta=reference.theta,
                                     **adapt_sampler.options(), batch_size=config.gen_batch_size, device=device,
                                     seed=seed)
                result = evaluate(generated.showers, reference, target, classifier=config.classifier,
                                  seed=seed, report_path=folder / f"evaluation_{arm}_n{n}_seed{seed}.json")
                rows.append({"part": "adaptation", "arm": arm, "n": n, "seed": seed, **summary,
                             "energy_calibrated": generated.energy_calibrated,
                             "generate_seconds": round(generated.seconds, 2), **eval_metrics(result)})
                log(f"[adaptation] seed {seed}, n {n}, {arm}: " + summary_line(rows[-1]))
    for n in config.adapt_n:
        fpd = {arm: [r["fpd"] for r in rows if r.get("arm") == arm and r["n"] == n]
               for arm in ("pretrained", "scratch")}
        ratio = float(np.mean(fpd["pretrained"]) / np.mean(fpd["scratch"])) if np.mean(fpd["scratch"]) > 0 else None
        per_seed = [a / b if b > 0 else None for a, b in zip(fpd["pretrained"], fpd["scratch"])]
        rows.append({"part": "adaptation", "arm": "ratio pretrained / scratch", "n": n,
                     "fpd_pretrained_mean": float(np.mean(fpd["pretrained"])),
                     "fpd_scratch_mean": float(np.mean(fpd["scratch"])), "fpd_ratio": ratio,
                     "fpd_ratio_per_seed": per_seed,
                     "meets_target": None if ratio is None else ratio <= TARGET_FPD_RATIO})
        log(f"[adaptation] n {n}: FPD ratio pretrained / scratch = {ratio}")
    return rows


# ----------------------------------------------------------------------------- command line


OPTION_HELP = {
    "model": "backbone preset name or JSON dict of pcfm.pretrain's model argument",
    "steps": "training steps of the quality model (at most, with --train-budget-s)",
    "train_budget_s": "choose the quality model's training steps to fit this many seconds (30-step calibration)",
    "batch_points": "point budget of a training batch",
    "lr": "peak learning rate (every run)", "n_train": "ds2 training showers",
    "energy_range": "incident energies, MeV, log-uniform LO HI",
    "n_reference": "reference (and ideal, and generated) showers",
    "samplers": "samplers of the quality evaluation, NAME:STEPS (one row each)", "gen_batch_size": "generation batch size",
    "classifier": "run the classifier tests (true/false)",
    "calibration": "evaluate the calibration rows: photons, and cell energies x 1.05 (true/false)",
    "energy_transform": "JSON dict of the diffusion energy transform (default: the objective's, log)",
    "target_geometry": "adaptation target geometry",
    "adapt_n": "target-geometry training set sizes", "adapt_steps": "training steps of each adaptation arm",
    "adapt_batch_points": "point budget of an adaptation batch", "adapt_seeds": "seeds of the adaptation runs",
    "n_target_reference": "target reference showers", "adapt_sampler": "sampler of the adaptation evaluation, NAME:STEPS",
    "speed_samplers": "samplers timed, NAME:STEPS", "batch_sizes": "batch sizes timed",
    "batch1_showers": "showers generated one by one at batch size 1",
    "speed_repeats": f"most runs of one speed measurement (best kept; only runs under {REPEAT_BELOW_S:g} s repeat)",
    "speed_cap_s": "longest a speed measurement may run (s); larger batches are measured smaller, and said so",
    "speed_devices": "devices timed (cpu, cuda)", "bf16": "also time bf16 autocast on CUDA (true/false)",
    "accelerator": "training accelerator (cpu, auto, gpu); generation follows it",
    "threads": "torch CPU threads (0: torch's default)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu", help="size preset (default cpu)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="models and reports (default pcfm_runs/generation_CONFIG)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file (a .md goes beside it)")
    add_config_options(parser, Config, OPTION_HELP, special={
        "model": {"type": parse_json_or_text}, "energy_transform": {"type": parse_json_or_text},
        "threads": {"type": int}, "train_budget_s": {"type": float}})
    return parser


def resolve(args) -> Config:
    config = apply_config_options(Config(**CONFIGS[args.config]), args)
    for spec in [*config.samplers, *config.speed_samplers, config.adapt_sampler]:
        Sampler.parse(spec)  # a bad NAME:STEPS fails now, not after an hour of training
    return config


def kept_rows(out: Path, config_name: str, settings: dict, parts: list[str]) -> tuple[list[dict], dict, list]:
    """Rows of the parts not run now from an earlier run into ``out`` with the same settings
    (so the parts can run one at a time), their timings, and that run's commands."""
    if not out.is_file():
        return [], {}, []
    try:
        earlier = json.loads(out.read_text())
        summary = next(r for r in earlier["results"] if r.get("part") == "summary")
    except (ValueError, KeyError, StopIteration):
        return [], {}, []
    if summary.get("config") != config_name or summary.get("settings") != settings:
        return [], {}, []
    kept = [r for r in earlier["results"] if r.get("part") not in (*parts, "summary")]
    if not kept:
        return [], {}, []
    kept_parts = sorted({r["part"] for r in kept})
    log(f"keeping the {', '.join(kept_parts)} rows of the earlier run with the same settings ({earlier['command']})")
    seconds = {k: v for k, v in (summary.get("part_seconds") or {}).items() if k in kept_parts}
    commands = (summary.get("earlier_runs") or []) + [{"command": earlier["command"], "parts": kept_parts}]
    return kept, seconds, commands


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    config = resolve(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    command, machine = announce()
    machine["knn_backend"] = knn_backend()
    name = "generation" if args.config == "cpu" else f"generation_{args.config}"
    out = Path(args.out) if args.out else RESULTS_DIR / f"{name}.json"
    plots = out.with_name(out.stem + "_plots")
    workdir = Path(args.workdir or f"pcfm_runs/generation_{args.config}")
    settings = as_json(dataclasses.asdict(config))
    log(f"config {args.config}: {json.dumps(settings)}")
    rows, part_seconds, earlier = kept_rows(out, args.config, settings, args.parts)

    def finish() -> None:
        rows[:] = [r for r in rows if r.get("part") != "summary"]
        written, skipped = make_plots(rows, plots)
        summary = {"part": "summary", "config": args.config, "settings": settings, "parts": args.parts,
                   "part_seconds": part_seconds, "total_wall_s": round(time.perf_counter() - start, 1),
                   "source_model": train_summary, "plots": written, "plots_skipped": skipped,
                   "workdir": str(workdir), "distilled_sampler": None, "earlier_runs": earlier}
        rows.append(summary)
        summary["targets"] = targets(rows)
        write_results(name, command, machine, rows, out)
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(report(rows, args.config, config, command, machine, out.parent))

    part_start = time.perf_counter()
    checkpoint, train_summary = train_source_model(config, workdir)
    part_seconds["train_source_model"] = round(time.perf_counter() - part_start, 1)
    for part in PARTS:
        if part not in args.parts:
            continue
        part_start = time.perf_counter()
        if part == "quality":
            rows += run_quality(config, checkpoint, train_summary, workdir, plots)
        elif part == "adaptation":
            rows += run_adaptation(config, checkpoint, workdir)
        else:
            rows += run_speed(config, checkpoint)
        part_seconds[part] = round(time.perf_counter() - part_start, 1)
        log(f"[{part}] done in {part_seconds[part]:.0f} s")
        finish()
    log("")
    log(out.with_suffix(".md").read_text())
    return rows


if __name__ == "__main__":
    main()
