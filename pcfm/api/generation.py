"""Generate showers with a pretrained point-diffusion model (:mod:`pcfm.tasks.diffusion`).

:func:`generate` loads a pretraining checkpoint that holds a ``diffusion`` objective, draws the
number of points of each shower from the model's points-per-event fit (unless given), samples
the point clouds batch by batch (EDM Heun or stochastic sampler, or DPM-Solver++(2M) for few
steps), and returns them in mm and MeV (the energy transform of the checkpoint inverted). Each
shower's total is then set to a visible energy drawn from the model's fit of the training data
(``calibrate_energy``). On a calorimeter geometry the points are also summed into its cells,
cells below the readout threshold are zeroed (as in the training data), and the showers can be
written as a CaloChallenge file.

A shower whose points all miss the cells (or fall below threshold) is not a valid CaloChallenge
event, and the training data hold none: such showers are drawn again, up to
:data:`EMPTY_SHOWER_RETRIES` times.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch_geometric.data import Data

from pcfm import geometry as geometries
from pcfm.data.calochallenge import write_calochallenge
from pcfm.data.events import CaloShowers
from pcfm.data.pointcloud import cloud_to_data, deposit_points
from pcfm.data.calochallenge import MAX_ENERGY_MEV
from pcfm.errors import ArgumentError, PcfmError
from pcfm.tasks.diffusion import PointDiffusion
from pcfm.tasks.pretrain import CheckpointError, PretrainModule

#: How often a shower that deposits nothing in any cell is drawn again.
EMPTY_SHOWER_RETRIES = 3


@dataclass
class GeneratedShowers:
    """What :func:`generate` returns.

    Attributes:
        points: one point cloud per shower (``pos`` mm, ``energy`` MeV, ``x`` features with the
            sizes of the cell each point lies in, ``cell`` -1 outside every cell, and the
            conditioning: ``incident_energy``, ``theta``, ``phi``, ``particle``, ``geometry``).
            Points whose generated energy is 0 are left out.
        showers: the points summed into the cells of a calorimeter geometry, cells below its
            readout threshold zeroed; None for other geometries.
        energy_outside: per shower, generated energy (MeV) that fell outside every cell; None
            for non-calorimeter geometries.
        seconds: wall time of sampling, deposition and conversion (not of loading the checkpoint
            or writing the file).
        path: the CaloChallenge file written, or None.
        energy_calibrated: whether each shower was rescaled to a visible energy drawn from the
            model's fit (``calibrate_energy``).
    """

    points: list[Data]
    showers: Optional[CaloShowers]
    energy_outside: Optional[np.ndarray]
    seconds: float
    path: Optional[Path]
    energy_calibrated: bool = False


def _device(device: Union[str, torch.device]) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _diffusion_objective(module: PretrainModule, source) -> PointDiffusion:
    for objective in module.objectives.values():
        if isinstance(objective, PointDiffusion):
            return objective
    raise CheckpointError(source, f"holds no diffusion objective to generate with (objectives: "
                                  f"{sorted(module.objectives)}); pretrain with objective='diffusion'")


def _per_shower(value, n: int, name: str, dtype) -> np.ndarray:
    values = np.asarray(value, dtype=dtype)
    if values.ndim == 0:
        return np.full(n, values, dtype=dtype)
    if values.shape != (n,):
        raise ArgumentError(f"{name} must be one value or one per shower ({n}), got shape {values.shape}")
    return values


def _check_arguments(energies: np.ndarray, theta: np.ndarray, phi: np.ndarray, steps, batch_size) -> None:
    """Refuse bad requests before the checkpoint is loaded, naming the argument and the shower."""
    if energies.size == 0:
        raise ArgumentError("energies: give at least one incident energy")
    bad = np.flatnonzero(~(np.isfinite(energies) & (energies > 0) & (energies <= MAX_ENERGY_MEV)))
    if bad.size:
        raise ArgumentError(f"energies: incident energies must be positive, finite and at most {MAX_ENERGY_MEV:.0e} "
                            f"MeV; shower {bad[0]} has {energies[bad[0]]}")
    bad = np.flatnonzero(~((theta > 0) & (theta < np.pi)))
    if bad.size:
        raise ArgumentError(f"theta must lie in (0, pi) radians (pi/2 is normal incidence); shower {bad[0]} has "
                            f"{float(theta[bad[0]])}")
    bad = np.flatnonzero(~np.isfinite(phi))
    if bad.size:
        raise ArgumentError(f"phi must be finite (radians); shower {bad[0]} has {float(phi[bad[0]])}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ArgumentError(f"{name} must be a whole number >= 1, got {value!r}")


def generate(checkpoint: Union[str, os.PathLike, PretrainModule], geometry, energies, *,
             theta: Union[float, Sequence[float]] = np.pi / 2, phi: Union[float, Sequence[float]] = 0.0,
             particle: Union[int, Sequence[int], None] = None, n_points: Union[int, Sequence[int], None] = None,
             steps: int = 20, sampler: str = "heun", batch_size: int = 100, device: Union[str, torch.device] = "auto",
             seed: Optional[int] = None, out: Union[str, os.PathLike, None] = None,
             progress: Optional[bool] = None, calibrate_energy: Optional[bool] = None) -> GeneratedShowers:
    """Generate one shower per incident energy with a pretrained diffusion model.

    Args:
        checkpoint: a pretraining checkpoint file with a ``diffusion`` objective, or such a
            :class:`PretrainModule` (it is moved to ``device``; its train/eval mode is restored).
        geometry: the geometry to generate for (name or object); its name is the model's
            geometry tag, and a calorimeter geometry gets the showers deposited into its cells.
        energies: incident energies (MeV), one per shower.
        theta, phi: incident angles (radians), one value or one per shower.
        particle: PDG code(s) recorded with the showers (the model does not condition on it).
        n_points: points per shower (one value or one per shower); None draws them from the
            model's fit of the training data.
        steps, sampler: sampler steps and "heun" (deterministic, 2 steps - 1 network calls),
            "stochastic" or "dpmpp2m" (deterministic, one call a step: the few-step choice).
        batch_size: showers sampled at once.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
        seed: seeds the numbers of points and all sampler noise; None draws fresh randomness.
        out: write the showers to this CaloChallenge HDF5 file (atomically); calorimeter only.
        progress: print one line per batch; None prints when there is more than one batch.
        calibrate_energy: rescale each shower's energies to a total visible energy drawn from the
            model's fit of the training data, given the shower's incident energy and number of
            points (:meth:`~pcfm.tasks.diffusion.PointDiffusion.sample_visible_energy`; on a
            calorimeter, the sum of its cells above threshold). The diffusion still shapes the
            shower; this fixes its total, which a point-wise denoiser gets wrong most easily.
            None: when the model has that fit for this geometry (checkpoints from before it
            existed do not); True: always (an error without the fit); False: never.

    Showers that still deposit nothing in any cell after the redraws (an untrained model, a
    model of another geometry), or whose cells all fall under the threshold once calibrated,
    give a warning naming them, or a :class:`~pcfm.errors.PcfmError` when writing ``out`` (a
    CaloChallenge file holds no empty showers; nothing is written).

    Raises:
        ArgumentError (a ValueError): energies not in (0, 1e7] MeV (none at all, NaN, inf),
        theta outside (0, pi), phi not finite, steps or batch_size below 1, n_points below 1,
        per-shower values of the wrong length; checked before the checkpoint is loaded.
    """
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    n = energies.size
    theta = _per_shower(theta, n, "theta", np.float32)
    phi = _per_shower(phi, n, "phi", np.float32)
    _check_arguments(energies, theta, phi, steps, batch_size)
    geometry = geometries.get(geometry)
    if out is not None and geometry.kind != "calorimeter":
        raise ArgumentError(f"out= writes CaloChallenge files, which need a calorimeter geometry; "
                            f"{geometry.name!r} is a {geometry.kind}")
    particle = None if particle is None else _per_shower(particle, n, "particle", np.int64)

    device = _device(device)
    module = checkpoint if isinstance(checkpoint, PretrainModule) else PretrainModule.load_from_checkpoint(
        checkpoint, map_location=device)
    diffusion = _diffusion_objective(module, "<in-memory PretrainModule>" if module is checkpoint else checkpoint)
    noise_generator = torch.Generator(device=device)
    count_generator = torch.Generator()
    for generator in (noise_generator, count_generator):
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    if n_points is None:
        n_points = diffusion.sample_n_points(energies, geometry.name, count_generator).numpy()
    n_points = _per_shower(n_points, n, "n_points", np.int64)
    if np.any(n_points < 1):
        raise ArgumentError(f"n_points: every shower needs at least 1 point; shower {int(np.argmax(n_points < 1))} "
                            f"has {int(n_points.min())}")
    if calibrate_energy is None:
        calibrate_energy = diffusion.has_visible_energy_model(geometry.name)
    visible_energy = None
    if calibrate_energy:
        visible_energy = diffusion.sample_visible_energy(energies, geometry.name, n_points, count_generator).numpy()
    requests = _Requests(geometry.name, energies, n_points, theta, phi, particle)
    if progress is None:
        progress = n > batch_size

    start = time.perf_counter()

    def sample(showers: np.ndarray, what: str) -> list[np.ndarray]:
        def report(done: int) -> None:
            if progress:
                print(f"[pcfm generate] {done}/{showers.size} {what}, {time.perf_counter() - start:.1f} s", flush=True)

        return _sample_clouds(diffusion, module.backbone, requests, showers, steps=steps, sampler=sampler,
                              batch_size=batch_size, generator=noise_generator, report=report)

    was_training = module.training
    module.to(device).eval()
    try:
        clouds = sample(np.arange(n), "showers sampled")
        showers = energy_outside = None
        if geometry.kind == "calorimeter":
            for attempt in range(EMPTY_SHOWER_RETRIES + 1):
                cells, energy_outside = _deposit(clouds, geometry)
                empty = np.flatnonzero(~(cells > 0).any(1))
                if empty.size == 0 or attempt == EMPTY_SHOWER_RETRIES:
                    break
                for i, cloud in zip(empty, sample(empty, "empty showers drawn again")):
                    clouds[i] = cloud
            if empty.size:
                _empty_showers(empty, energies, geometry, out,
                               f"the model generated no cell above it, even after {EMPTY_SHOWER_RETRIES} redraws (its "
                               f"points fall outside the cells or under the threshold). Is the model trained (on "
                               f"this geometry)?")
            if visible_energy is not None:  # rescale to the drawn totals of the cells, deposit again
                _rescale(clouds, visible_energy, cells.sum(1))
                cells, energy_outside = _deposit(clouds, geometry)
                emptied = np.setdiff1d(np.flatnonzero(~(cells > 0).any(1)), empty)
                if emptied.size:
                    k = int(emptied[0])
                    _empty_showers(emptied, energies, geometry, out,
                                   f"once rescaled to the visible energy drawn for it ({visible_energy[k]:.4g} MeV), "
                                   f"every cell the model generated falls under it; calibrate_energy=False keeps the "
                                   f"sampled totals.")
            showers = CaloShowers(energies.astype(np.float32), cells, geometry.name, theta=theta, phi=phi,
                                  particle=particle)
        elif visible_energy is not None:
            _rescale(clouds, visible_energy, np.array([cloud[:, 3].sum() for cloud in clouds]))
    finally:
        module.train(was_training)
    points = [cloud_to_data(rows, float(energies[i]), geometry, theta=float(theta[i]), phi=float(phi[i]),
                            particle=None if particle is None else int(particle[i]), event=i)
              for i, rows in enumerate(clouds)]
    seconds = time.perf_counter() - start
    path = None
    if out is not None:
        path = Path(out)
        write_calochallenge(path, showers)
    return GeneratedShowers(points=points, showers=showers, energy_outside=energy_outside, seconds=seconds, path=path,
                            energy_calibrated=bool(calibrate_energy))


def _empty_showers(empty: np.ndarray, energies: np.ndarray, geometry, out, why: str) -> None:
    """Name the showers the model left without any cell above threshold: a PcfmError when
    writing ``out`` (a CaloChallenge file holds no empty shower), a warning otherwise."""
    first = int(empty[0])
    shown = ", ".join(str(int(i)) for i in empty[1:6]) + (", ..." if empty.size > 6 else "")
    others = (f" and {empty.size - 1} more of the {energies.size} (shower{'s' if empty.size > 2 else ''} {shown})"
              if empty.size > 1 else "")
    have = "have" if empty.size > 1 else "has"
    problem = (f"generated shower {first} (incident energy {energies[first]:.6g} MeV){others} {have} no cell above the "
               f"readout threshold of {geometry.name} ({geometry.readout_threshold_mev:g} MeV): {why}")
    if out is not None:
        raise PcfmError(f"{problem} Nothing was written to {out}.")
    warnings.warn(problem, stacklevel=3)


@dataclass
class _Requests:
    """What to generate, one entry per shower."""

    geometry: str
    energies: np.ndarray
    n_points: np.ndarray
    theta: np.ndarray
    phi: np.ndarray
    particle: Optional[np.ndarray]


def _sample_clouds(diffusion: PointDiffusion, backbone, requests: _Requests, showers: np.ndarray, *, steps: int,
                   sampler: str, batch_size: int, generator: torch.Generator, report) -> list[np.ndarray]:
    """Point clouds (n, 4) = x, y, z (mm), energy (MeV) of the requested ``showers``, batch by batch."""
    clouds = []
    for first in range(0, showers.size, batch_size):
        chunk = showers[first:first + batch_size]
        template = PointDiffusion.make_template(
            requests.energies[chunk], requests.n_points[chunk], requests.geometry, theta=requests.theta[chunk],
            phi=requests.phi[chunk], particle=None if requests.particle is None else requests.particle[chunk])
        pos, energy = diffusion.sample(backbone, template, steps=steps, sampler=sampler, generator=generator)
        points = torch.cat([pos, energy[:, None]], 1).double().cpu().numpy()
        if not np.all(np.isfinite(points)):
            raise PcfmError(f"the sampler produced non-finite points for showers {chunk.tolist()} "
                            "(diverged: try more steps or another checkpoint)")
        clouds += np.split(points, np.cumsum(requests.n_points[chunk])[:-1])
        report(first + chunk.size)
    return clouds


def _rescale(clouds: list[np.ndarray], target: np.ndarray, current: np.ndarray) -> None:
    """Scale each cloud's energies by target / current (in place); a cloud with nothing is left."""
    for cloud, wanted, now in zip(clouds, target, current):
        if now > 0:
            cloud[:, 3] *= wanted / now


def _deposit(clouds: list[np.ndarray], geometry) -> tuple[np.ndarray, np.ndarray]:
    """Cells (N, n_cells) of the clouds, zeroed below the readout threshold, and energy outside."""
    rows = np.concatenate(clouds)
    batch = np.repeat(np.arange(len(clouds)), [cloud.shape[0] for cloud in clouds])
    cells, _, energy_outside = deposit_points(rows[:, :3], rows[:, 3], batch, len(clouds), geometry)
    cells[cells < geometry.readout_threshold_mev] = 0.0
    return cells, energy_outside

