"""The speed part of benchmarks/generation.py: showers per second of :func:`pcfm.generate` at each
batch size, sampler, device and precision, with the cap on a measurement's time and the halving
on GPU out-of-memory.

Separate from generation.py because it shares nothing with the training and evaluation of the
quality and adaptation parts: it only loads the trained checkpoint and times it.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from _common import log
from generation_config import REPEAT_BELOW_S, SOURCE_GEOMETRY, Config, Sampler
from pcfm.api import generate
from pcfm.data.pointcloud import deposit_points
from pcfm.tasks.pretrain import PretrainModule


def nice_floor(value: float) -> int:
    """The largest number <= value of the form d * 10^k or dd * 10^k (two significant digits)."""
    if value < 1:
        return 0
    scale = 10 ** max(0, int(math.floor(math.log10(value))) - 1)
    return int(value // scale * scale)


def timed_generate(module, energies: np.ndarray, *, sampler: Sampler, batch_size: int, device: str,
                   bf16: bool) -> tuple[float, float, float]:
    """Seconds of one generate call, seconds of depositing its points again, mean points per shower."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        result = generate(module, SOURCE_GEOMETRY, energies, **sampler.options(), batch_size=batch_size,
                          device=device, seed=0, progress=False)
    positions = np.concatenate([d.pos.numpy() for d in result.points])
    energy = np.concatenate([d.energy.numpy() for d in result.points])
    batch = np.repeat(np.arange(len(result.points)), [d.num_nodes for d in result.points])
    start = time.perf_counter()
    deposit_points(positions, energy, batch, len(result.points), SOURCE_GEOMETRY)
    deposit = time.perf_counter() - start
    return result.seconds, deposit, float(np.mean([d.num_nodes for d in result.points]))


def speed_row(module, energies, *, setting: dict, sampler: Sampler, batch: int, n_showers: int, note: str,
              repeats: int) -> dict:
    """Time ``n_showers`` in batches of ``batch`` (best of up to ``repeats`` short runs)."""
    runs = []
    while len(runs) < repeats:
        runs.append(timed_generate(module, energies[:n_showers], sampler=sampler, batch_size=batch,
                                   device=setting["device"], bf16=setting["precision"] == "bf16"))
        if runs[-1][0] > REPEAT_BELOW_S:
            break
    seconds, deposit, points = min(runs)
    return {**setting, "batch": batch, "n_showers": n_showers,
            "repeats": len(runs), "seconds": round(seconds, 4), "showers_per_s": n_showers / seconds,
            "ms_per_shower": 1000 * seconds / n_showers, "deposit_ms_per_shower": 1000 * deposit / n_showers,
            "sampling_ms_per_shower": 1000 * (seconds - deposit) / n_showers, "mean_points": points, "note": note}


def measure_batch(module, energies, config: Config, setting: dict, sampler: Sampler, batch: int, note: str) -> dict:
    """One speed row at ``batch`` (halved on GPU out-of-memory, and said so)."""
    requested = setting["batch_requested"]
    while True:
        try:
            return speed_row(module, energies, setting=setting, sampler=sampler, batch=batch,
                             n_showers=config.batch1_showers if batch == 1 else batch, note=note,
                             repeats=config.speed_repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                return {**setting, "batch": None, "note": "not measured: out of GPU memory at batch 1"}
            batch //= 2
            note = f"batch {requested}: out of GPU memory at larger batches; measured at batch {batch}"


def time_sampler(module, energies, config: Config, device: str, precision: str, sampler: Sampler) -> list[dict]:
    """Speed rows of one sampler at every batch size; a batch projected past the cap runs smaller."""
    label = f"[speed] {device} {precision} {sampler.label}"
    base = {"part": "speed", "device": device, "precision": precision, **sampler.fields(),
            "energy_calibrated": sampler.calibrated}
    try:  # warm-up: allocations, kernels
        timed_generate(module, energies[:2], sampler=sampler, batch_size=2, device=device, bf16=precision == "bf16")
    except Exception as exc:  # noqa: BLE001 - a failing setting is a result, not a crash
        log(f"{label}: failed ({exc})")
        return [{**base, "note": f"failed: {type(exc).__name__}: {exc}"}]
    rows, per_shower = [], None
    for requested in sorted(config.batch_sizes):
        setting, batch, note = {**base, "batch_requested": requested}, requested, ""
        if per_shower is not None and per_shower * requested > config.speed_cap_s:
            projected = per_shower * requested
            batch = nice_floor(config.speed_cap_s / per_shower)
            if batch <= max((r.get("batch") or 0 for r in rows), default=0):
                rows.append({**setting, "batch": None,
                             "note": f"not measured: batch {requested} would take about {projected:.3g} s > cap "
                                     f"{config.speed_cap_s:g} s, and no batch between the previous one and "
                                     f"{requested} fits"})
                log(f"{label}: batch {requested}: {rows[-1]['note']}")
                continue
            note = (f"batch {requested} would take about {projected:.3g} s > cap {config.speed_cap_s:g} s: "
                    f"measured at batch {batch} instead")
        rows.append(measure_batch(module, energies, config, setting, sampler, batch, note))
        row = rows[-1]
        if row.get("seconds"):
            per_shower = row["seconds"] / row["n_showers"]
            log(f"{label}: batch {row['batch']}: {row['showers_per_s']:.1f} showers/s, {row['ms_per_shower']:.2f} "
                f"ms/shower (deposition {row['deposit_ms_per_shower']:.2f} ms)" + (f" [{note}]" if note else ""))
    return rows


def run_speed(config: Config, checkpoint: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    low, high = config.energy_range
    energies = np.exp(rng.uniform(np.log(low), np.log(high), max(max(config.batch_sizes), config.batch1_showers)))
    rows = []
    for device in config.speed_devices:
        if device == "cuda" and not torch.cuda.is_available():
            rows.append({"part": "speed", "device": "cuda", "note": "not measured: torch sees no CUDA device"})
            log("[speed] cuda: not measured, no CUDA device")
            continue
        module = PretrainModule.load_from_checkpoint(checkpoint, map_location=device).to(device)
        precisions = ["fp32"] + (["bf16"] if config.bf16 and device == "cuda" and torch.cuda.is_bf16_supported()
                                 else [])
        for precision in precisions:
            for sampler in map(Sampler.parse, config.speed_samplers):
                rows += time_sampler(module, energies, config, device, precision, sampler)
        del module
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
