"""``pcfm`` command line: pretrain, generate, simulate, inspect, list geometries, quickstart.

Every sub-command is a thin layer over the Python API, so that what the command line does a
script can do too.

A user's mistake (a bad value, a missing or bad file, an unknown name) is one line on stderr,
``pcfm <command>: error: ...``, and exit code 2, as argparse does for bad options: the
command-line values are checked here, and a :class:`~pcfm.errors.PcfmError`, ``ValueError``
(Python's and pcfm's error for a bad value) or ``FileNotFoundError`` from the API is shown the
same way. Any other exception is an internal error and keeps its traceback; set
``PCFM_TRACEBACK=1`` to see the traceback of the one-line errors too.
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pcfm.errors import ArgumentError, PcfmError


def _range(text: str, option: str = "the value") -> float | tuple[float, float]:
    """``"1000"`` -> 1000.0 and ``"1000:1e6"`` -> (1000.0, 1e6); an ArgumentError naming
    ``option`` if the text is neither."""
    try:
        if ":" in text:
            lo, hi = (float(v) for v in text.split(":", 1))
            return lo, hi
        return float(text)
    except ValueError:
        raise ArgumentError(f"{option}: expected a number or a range LO:HI, got {text!r}") from None


def _positive_range(text: str, option: str, unit: str) -> float | tuple[float, float]:
    """:func:`_range` whose values are finite and positive, LO <= HI (energies, counts)."""
    value = _range(text, option)
    values = value if isinstance(value, tuple) else (value,)
    if not all(math.isfinite(v) and v > 0 for v in values) or values[0] > values[-1]:
        raise ArgumentError(f"{option}: values must be positive and finite {unit}"
                            + (" with LO <= HI" if len(values) == 2 else "") + f", got {text!r}")
    return value


def _at_least(value: int, least: int, option: str) -> int:
    if value < least:
        raise ArgumentError(f"{option} must be at least {least}, got {value}")
    return value


def _theta_radians(text: str, option: str = "--theta-deg") -> float | tuple[float, float]:
    """Degrees (fixed or LO:HI) inside (0, 180) to radians."""
    theta = _range(text, option)
    values = theta if isinstance(theta, tuple) else (theta,)
    if not all(0 < v < 180 for v in values) or values[0] > values[-1]:
        raise ArgumentError(f"{option}: angles must lie in (0, 180) degrees (90 is normal incidence)"
                            + (" with LO <= HI" if len(values) == 2 else "") + f", got {text!r}")
    return tuple(float(v) for v in np.radians(values)) if isinstance(theta, tuple) else float(np.radians(theta))


def _cmd_geometries(args) -> int:
    from pcfm import geometry

    print(f"{'name':28s} {'kind':12s} {'cells':>10s} {'depth':>22s}  description")
    for name in geometry.available():
        geo = geometry.get(name)
        print(f"{name:28s} {geo.kind:12s} {geo.n_cells:10d} {geo.extent_text():>22s}  {geo.description}")
    return 0


def _cmd_simulate_calo(args) -> int:
    from pcfm.data import write_calochallenge
    from pcfm.sim import simulate_showers

    _at_least(args.n, 1, "--n")
    energy = _positive_range(args.energy, "--energy", "MeV")
    theta = _theta_radians(args.theta_deg)
    start = time.perf_counter()
    showers = simulate_showers(args.geometry, args.n, particle=args.particle, energy=energy,
                               theta=theta, seed=args.seed)
    seconds = time.perf_counter() - start
    write_calochallenge(args.out, showers)
    ratio = showers.showers.sum(1) / showers.incident_energies
    print(f"simulated {args.n} {args.particle} showers on {args.geometry} in {seconds:.2f} s "
          f"({args.n / seconds:.0f}/s); E_dep/E_inc mean {ratio.mean():.3f}; "
          f"cells hit per shower {np.mean((showers.showers > 0).sum(1)):.0f}; wrote {args.out}")
    return 0


def _cmd_simulate_lartpc(args) -> int:
    from pcfm.data import write_pilarnet
    from pcfm.sim import simulate_lartpc_events

    _at_least(args.n, 1, "--n")
    target = _positive_range(args.points, "--points", "numbers of points") if args.points else None
    if isinstance(target, float):
        raise ArgumentError(f"--points takes a range LO:HI, got {args.points!r}")
    start = time.perf_counter()
    events = simulate_lartpc_events(args.n, seed=args.seed, target_points=target)
    seconds = time.perf_counter() - start
    write_pilarnet(args.out, events)
    sizes = np.array([e.points.shape[0] for e in events])
    print(f"simulated {args.n} LArTPC events in {seconds:.2f} s; points per event median "
          f"{np.median(sizes):.0f} (min {sizes.min()}, max {sizes.max()}); wrote {args.out}")
    return 0


def _cmd_inspect(args) -> int:
    """Validate every event of each file and print a summary; exit 1 if any event is bad."""
    from pcfm.data import detect_format, open_dataset

    _at_least(args.max_problems, 0, "--max-problems")
    bad = 0
    for path in args.files:
        fmt = detect_format(path)
        dataset = open_dataset(path, format=fmt, geometry=args.geometry, on_error="skip")  # no events: DataError
        report = dataset.scan()
        sizes = dataset.event_sizes() if report.n_skipped < report.n_checked else np.zeros(0)
        spread = (f"points per event median {np.median(sizes):.0f} (min {sizes.min()}, max {sizes.max()})"
                  if sizes.size else "no good event")
        print(f"{path}: {fmt}, {report.n_checked} events, {spread}; {report.n_skipped} bad")
        for problem in report.problems[: args.max_problems]:
            print(f"  {problem}")
        bad += report.n_skipped
    return 1 if bad else 0


def _cmd_pretrain(args) -> int:
    """``pcfm pretrain --config FILE key=value ...``: the YAML keys are pcfm.pretrain's arguments."""
    from pcfm.api import pretrain

    config = _run_config(args, pretrain)
    if args.init_from is not None:
        config["init_from"] = str(args.init_from)
    result = pretrain(**config)
    if result.initialised_from:
        init = result.initialised_from
        print(f"initialised from {init['source']}: {len(init['copied'])} tensors copied, "
              f"{len(init['not_in_checkpoint'])} trained from scratch")
    losses = [row["train/loss"] for row in result.history if row.get("train/loss") is not None]
    if losses:
        print(f"train loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} logged steps")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} = {value:.4f}")
    print(f"checkpoint: {result.checkpoint_path}")
    return 0


def _cmd_finetune(args) -> int:
    """``pcfm finetune --config FILE key=value ...``: the YAML keys are pcfm.finetune's arguments."""
    from pcfm.api import finetune

    config = _run_config(args, finetune)
    if args.patience is not None:
        config["patience"] = args.patience
    if args.no_resume:
        config["resume"] = False
    result = finetune(**config)
    training = result.training
    resumed = training.get("resumed_from_step")
    print(f"trained {training['steps']} of {training['max_steps']} steps"
          + (" (stopped early: no lower validation loss)" if training.get("stopped_early") else "")
          + ("" if resumed is None else f"; resumed from step {resumed}"))
    if training.get("best_val_loss") is not None:
        print(f"tested {result.tested_checkpoint} (step {training['tested_step']}, "
              f"validation loss {training['best_val_loss']:.4f})")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key} = {value:.4f}" if isinstance(value, float) else f"  {key} = {value}")
    print(f"metrics: {result.metrics_path}\ncheckpoint: {result.checkpoint_path}")
    return 0


def _run_config(args, function) -> dict:
    """The YAML file plus overrides, checked against ``function``'s keyword arguments."""
    from pcfm.config import ConfigError, apply_overrides, load_config

    config = apply_overrides(load_config(args.config) if args.config else {}, args.overrides)
    known = set(inspect.signature(function).parameters)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{args.config or 'command line'}: unknown option(s) {', '.join(unknown)}; "
                          f"pcfm.{function.__name__} takes {', '.join(sorted(known))}")
    return config


def _cmd_generate(args) -> int:
    from pcfm.api import generate

    _at_least(args.n, 1, "--n")
    _at_least(args.steps, 1, "--steps")
    _at_least(args.batch_size, 1, "--batch-size")
    energy = _positive_range(args.energy, "--energy", "MeV")
    theta = _theta_radians(args.theta_deg)
    if isinstance(theta, tuple):
        raise ArgumentError(f"--theta-deg takes one angle, got {args.theta_deg!r}")
    rng = np.random.default_rng(args.seed)
    energies = (np.exp(rng.uniform(np.log(energy[0]), np.log(energy[1]), args.n)) if isinstance(energy, tuple)
                else np.full(args.n, energy))
    result = generate(args.checkpoint, args.geometry, energies, theta=theta,
                      steps=args.steps, sampler=args.sampler, batch_size=args.batch_size, seed=args.seed,
                      calibrate_energy=False if args.no_energy_calibration else None,
                      out=args.out)
    print(f"generated {args.n} showers on {args.geometry} in {result.seconds:.1f} s "
          f"({args.n / result.seconds:.1f}/s)" + (f"; wrote {result.path}" if result.path else ""))
    return 0


def _cmd_evaluate(args) -> int:
    """Compare generated with reference showers (CaloChallenge files) and write the report."""
    from pcfm.api import evaluate

    result = evaluate(args.generated, args.reference, args.geometry, classifier=not args.no_classifier,
                      allow_geometry_mismatch=args.allow_geometry_mismatch, clip_negative=args.clip_negative,
                      keep_empty=args.keep_empty, plots_dir=args.plots, report_path=args.report, seed=args.seed)
    sep = result["separation_power"]
    print(f"separation power: mean {sep['mean']:.4f}, max {sep['max']:.4f} ({sep['max_feature']}); "
          f"FPD {result['fpd']:.3f}; KPD {result['kpd']:.5f} +- {result['kpd_std']:.5f}")
    fpd, kpd = result["fpd_jetnet"], result["kpd_jetnet"]
    print(f"JetNet definitions (x 10^3): FPD {1e3 * fpd['value']:.4g} +- {1e3 * fpd['error']:.2g}; "
          f"KPD {1e3 * kpd['value']:.4g} +- {1e3 * kpd['error']:.2g} ("
          + ("comparable with published CaloChallenge values)" if fpd["comparable"] else
             "not comparable with published values: fewer than 10000 showers a side)"))
    for role in ("generated", "reference"):
        counts = result["inputs"][role]
        if counts["negative_cells"] or counts["empty_showers"]:
            print(f"{role}: {counts['negative_cells']} negative cells set to 0 "
                  f"({counts['negative_energy_mev']:.6g} MeV), {counts['empty_showers']} empty showers kept")
    for name, auc in (result.get("classifier") or {}).items():
        if auc is not None:
            print(f"classifier AUC ({name.replace('_', '-')}): {auc['auc']:.3f}")
    if args.report:
        print(f"report: {args.report}")
    return 0


def _cmd_quickstart(args) -> int:
    from pcfm.api import run_quickstart

    run_quickstart(workdir=args.workdir, seed=args.seed, pretrain_steps=_at_least(args.steps, 1, "--steps"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcfm", description="Point-cloud foundation models for detector data.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("geometries", help="list the detector geometries pcfm knows").set_defaults(func=_cmd_geometries)

    simulate = sub.add_parser("simulate", help="simulate showers or LArTPC events into a data file")
    sim_sub = simulate.add_subparsers(dest="what", required=True)
    calo = sim_sub.add_parser("calo", help="calorimeter showers, written as CaloChallenge HDF5")
    calo.add_argument("--geometry", default="calochallenge-ds2")
    calo.add_argument("--particle", default="electron", help="electron, photon or pion")
    calo.add_argument("--n", type=int, default=1000, help="number of showers")
    calo.add_argument("--energy", default="1000:1000000", help="MeV: fixed (E) or log-uniform (LO:HI)")
    calo.add_argument("--theta-deg", default="90", help="polar angle in degrees: fixed or LO:HI")
    calo.add_argument("--seed", type=int, default=0)
    calo.add_argument("--out", required=True, type=Path)
    calo.set_defaults(func=_cmd_simulate_calo)
    lar = sim_sub.add_parser("lartpc", help="LArTPC events, written as PILArNet-M v2 HDF5")
    lar.add_argument("--n", type=int, default=100, help="number of events")
    lar.add_argument("--points", default=None, help="approximate points per event, LO:HI")
    lar.add_argument("--seed", type=int, default=0)
    lar.add_argument("--out", required=True, type=Path)
    lar.set_defaults(func=_cmd_simulate_lartpc)

    inspect = sub.add_parser("inspect", help="validate data files (any supported format) and summarise them")
    inspect.add_argument("files", nargs="+", type=Path)
    inspect.add_argument("--geometry", default=None)
    inspect.add_argument("--max-problems", type=int, default=20)
    inspect.set_defaults(func=_cmd_inspect)

    pre = sub.add_parser("pretrain", help="pretrain a backbone (masked point modelling and/or point diffusion)")
    pre.add_argument("--config", type=Path, default=None, help="YAML file of pcfm.pretrain arguments (see configs/)")
    pre.add_argument("--init-from", type=Path, default=None,
                     help="pretraining checkpoint whose weights start this new run (fresh optimiser and schedule; "
                          "not a resume)")
    pre.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=100 model=small")
    pre.set_defaults(func=_cmd_pretrain)

    fine = sub.add_parser("finetune", help="fine-tune a backbone: classification, regression or segmentation")
    fine.add_argument("--config", type=Path, default=None, help="YAML file of pcfm.finetune arguments")
    fine.add_argument("--patience", type=int, default=None,
                      help="stop after this many validations without a lower validation loss (patience=N)")
    fine.add_argument("--no-resume", action="store_true",
                      help="start afresh, deleting the workdir's checkpoints (resume=false); by default a rerun "
                           "resumes its own run")
    fine.add_argument("overrides", nargs="*", help="key=value overrides, e.g. task=classification n_labels=100")
    fine.set_defaults(func=_cmd_finetune)

    gen = sub.add_parser("generate", help="generate showers with a pretrained diffusion model")
    gen.add_argument("--checkpoint", required=True, type=Path)
    gen.add_argument("--geometry", default="calochallenge-ds2")
    gen.add_argument("--n", type=int, default=100, help="number of showers")
    gen.add_argument("--energy", default="1000:100000", help="MeV: fixed (E) or log-uniform (LO:HI)")
    gen.add_argument("--theta-deg", default="90", help="polar angle in degrees, in (0, 180)")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--sampler", default="heun", choices=["heun", "stochastic", "dpmpp2m"],
                     help="heun: 2 steps - 1 network calls; dpmpp2m: one call a step (few steps)")
    gen.add_argument("--batch-size", type=int, default=100)
    gen.add_argument("--no-energy-calibration", action="store_true",
                     help="keep the sampled totals instead of rescaling each shower to a visible energy drawn "
                          "from the model's fit")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--out", type=Path, default=None, help="CaloChallenge HDF5 file to write")
    gen.set_defaults(func=_cmd_generate)

    ev = sub.add_parser("evaluate", help="CaloChallenge-style metrics: generated vs reference showers")
    ev.add_argument("generated", type=Path)
    ev.add_argument("reference", type=Path)
    ev.add_argument("--geometry", default=None)
    ev.add_argument("--report", type=Path, default=None, help="JSON report path (a .md summary goes beside it)")
    ev.add_argument("--plots", type=Path, default=None, help="folder for PNG plots (needs matplotlib)")
    ev.add_argument("--no-classifier", action="store_true")
    ev.add_argument("--allow-geometry-mismatch", action="store_true",
                    help="evaluate even when the two files name different geometries (or --geometry contradicts "
                         "one); refused by default")
    ev.add_argument("--clip-negative", action="store_true",
                    help="set negative cells to 0 (the CaloChallenge evaluation accepts them); refused by default")
    ev.add_argument("--keep-empty", action="store_true",
                    help="keep showers whose cells are all zero (features 0), as the CaloChallenge evaluation "
                         "does; refused by default")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_cmd_evaluate)

    quick = sub.add_parser("quickstart", help="a tour of pcfm on simulated data (minutes on a CPU)")
    quick.add_argument("--workdir", type=Path, default=Path("pcfm_runs/quickstart"))
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--steps", type=int, default=300, help="pretraining steps")
    quick.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PcfmError, ValueError, FileNotFoundError) as err:  # a user's mistake: one line (module doc)
        if os.environ.get("PCFM_TRACEBACK"):
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "what", None))))
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"pcfm {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
