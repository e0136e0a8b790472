"""Invertible preprocessing of per-point energies for generative models.

Cell energies of one shower span six or more orders of magnitude (15 keV threshold hits next to
100 GeV core cells), so a diffusion model cannot work on them directly. :class:`EnergyTransform`
maps an energy ``E`` (MeV) to a value ``u`` of order one in two steps:

1. a fixed map, chosen by ``kind``:

   - ``"log"``: ``v = log(max(E, floor_mev) / reference_mev)``;
   - ``"fraction"``: ``v = E / E_inc``, the share of the incident energy, or with ``log=True``
     ``v = log(max(E, floor_mev) / E_inc)`` (the incident energy is then part of the input);
   - ``"power"``: ``v = E ** exponent`` (e.g. 0.5 or 0.3: compresses the range less than a log
     and keeps 0 at 0);

2. a standardisation ``u = (v - mean) / std`` with ``mean`` and ``std`` fitted on training
   energies (:meth:`EnergyTransform.fit`).

:meth:`EnergyTransform.inverse` undoes both exactly and clamps to ``E >= 0`` (a generated ``v``
below 0 in the power or plain fraction kinds means no energy). The floor only matters for
log kinds: energies below it (zero-energy LArTPC points) come back as the floor. The maths runs in
float64 whatever the input dtype, so a float64 round trip is exact to better than 1e-9 relative; in float32 the log
kinds round-trip to about 1e-6 relative, while the power kind amplifies the rounding of ``u`` by
its slope ``std / (exponent v)``, which grows at small energies.

The choice and the fitted statistics round-trip through a plain dict (:meth:`to_dict`,
:meth:`from_dict`) and are also buffers, so a checkpoint restores them either way and
generation inverts exactly the transform the model was trained with.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

#: The fixed maps, with the options each takes and their defaults. ``mean`` and ``std`` (the
#: standardisation) are options of every kind.
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "log": {"reference_mev": 1.0, "floor_mev": 1e-6},
    "fraction": {"log": False, "floor_mev": 1e-6},
    "power": {"exponent": 0.5},
}
STANDARDISATION = {"mean": 0.0, "std": 1.0}


class EnergyTransform(nn.Module):
    """``u = (v(E) - mean) / std`` and its exact inverse; see the module docstring.

    Args:
        kind: "log", "fraction" or "power".
        **options: the kind's options (:data:`KIND_OPTIONS`) and ``mean``, ``std``; an option
            of another kind is an error, so a typo or a wrong combination never goes unnoticed.
    """

    def __init__(self, kind: str = "log", **options):
        super().__init__()
        if kind not in KIND_OPTIONS:
            raise ValueError(f"unknown energy transform kind {kind!r}; choose from {sorted(KIND_OPTIONS)}")
        allowed = {**KIND_OPTIONS[kind], **STANDARDISATION}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"option(s) {unknown} do not apply to energy transform kind {kind!r}; "
                             f"its options are {sorted(allowed)}")
        values = {**allowed, **options}
        self.kind = kind
        self.options = {key: values[key] for key in KIND_OPTIONS[kind]}
        for key in ("reference_mev", "floor_mev", "exponent"):
            if key in self.options:
                value = float(self.options[key])
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"energy transform option {key} must be positive and finite, got {value}")
                self.options[key] = value
        if "log" in self.options:
            if not isinstance(self.options["log"], bool):
                raise ValueError(f"energy transform option log must be True or False, got {self.options['log']!r}")
        mean, std = float(values["mean"]), float(values["std"])
        self._check_statistics(mean, std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64))

    @staticmethod
    def _check_statistics(mean: float, std: float) -> None:
        if not math.isfinite(mean):
            raise ValueError(f"energy transform mean must be finite, got {mean}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"energy transform std must be positive and finite, got {std}")

    @property
    def uses_incident_energy(self) -> bool:
        return self.kind == "fraction"

    @property
    def _has_log(self) -> bool:
        return self.kind == "log" or (self.kind == "fraction" and self.options["log"])

    def _incident(self, incident: Optional[Tensor], energy: Tensor) -> Optional[Tensor]:
        """The incident energy broadcast to ``energy`` (float64), checked, when the kind needs it."""
        if not self.uses_incident_energy:
            return None
        if incident is None:
            raise ValueError("energy transform kind 'fraction' needs the incident energy of every point")
        incident = torch.as_tensor(incident, device=energy.device).to(torch.float64).expand_as(energy)
        if not bool(torch.all(torch.isfinite(incident) & (incident > 0))):
            raise ValueError("energy transform kind 'fraction' needs positive, finite incident energies")
        return incident

    def fixed_map(self, energy: Tensor, incident: Optional[Tensor] = None) -> Tensor:
        """Step 1 only: ``v(E)`` in float64 (``energy`` in MeV, ``incident`` broadcastable to it)."""
        energy = torch.as_tensor(energy).to(torch.float64)
        incident = self._incident(incident, energy)
        if self._has_log:
            energy = energy.clamp(min=self.options["floor_mev"])
        if self.kind == "log":
            return torch.log(energy / self.options["reference_mev"])
        if self.kind == "fraction":
            fraction = energy / incident
            return torch.log(fraction) if self.options["log"] else fraction
        return energy.clamp(min=0).pow(self.options["exponent"])

    def forward(self, energy: Tensor, incident: Optional[Tensor] = None) -> Tensor:
        """``u`` of energies ``energy`` (MeV), in ``energy``'s floating dtype."""
        energy = torch.as_tensor(energy)
        dtype = energy.dtype if energy.is_floating_point() else torch.get_default_dtype()
        return ((self.fixed_map(energy, incident) - self.mean) / self.std).to(dtype)

    def inverse(self, u: Tensor, incident: Optional[Tensor] = None) -> Tensor:
        """Energies (MeV, >= 0) of transformed values ``u``, in ``u``'s dtype."""
        dtype = u.dtype
        v = u.to(torch.float64) * self.std + self.mean
        incident = self._incident(incident, v)
        if self.kind == "log":
            energy = torch.exp(v) * self.options["reference_mev"]
        elif self.kind == "fraction":
            energy = (torch.exp(v) if self.options["log"] else v.clamp(min=0)) * incident
        else:
            energy = v.clamp(min=0).pow(1.0 / self.options["exponent"])
        # a value beyond the dtype's range (an untrained model's output) saturates instead of inf
        return energy.clamp(max=torch.finfo(dtype).max).to(dtype)

    def fit(self, energy: Tensor, incident: Optional[Tensor] = None) -> "EnergyTransform":
        """Set ``mean`` and ``std`` to those of ``v(energy)`` (training energies, MeV)."""
        v = self.fixed_map(energy, incident).reshape(-1)
        if v.numel() < 2:
            raise ValueError(f"fitting an energy transform needs at least 2 energies, got {v.numel()}")
        if not bool(torch.all(torch.isfinite(v))):
            raise ValueError("cannot fit the energy transform: non-finite transformed energies "
                             "(NaN or infinite energies in the data?)")
        mean, std = float(v.mean()), float(v.std())
        self._check_statistics(mean, std)
        self.mean.fill_(mean)
        self.std.fill_(std)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Kind, options and fitted statistics as plain types (JSON, YAML, checkpoints)."""
        return {"kind": self.kind, **self.options, "mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EnergyTransform":
        """Inverse of :meth:`to_dict`."""
        values = dict(values)
        if "kind" not in values:
            raise ValueError(f"an energy transform dict needs a 'kind', got keys {sorted(values)}")
        return cls(values.pop("kind"), **values)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items())
