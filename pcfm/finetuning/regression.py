"""Event regression: the incident energy (as log(E / MeV)) and / or the polar angle.

The outputs are standardised targets, predicted as a linear calibration on the event's log
visible energy (the start of every calorimeter energy measurement; its slope is fitted on the
training events by least squares before training) plus a correction that the head computes from
the pooled embedding and the visible energy (its output layer starts at zero, so training starts
from the calibration). The targets are hidden from the backbone's event conditioning
(:func:`~pcfm.nn.hide_condition`), which would otherwise read them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pcfm.finetuning.task import DownstreamTask, as_float_list, mlp_head
from pcfm.tasks.objective import load_missing_as_zeros

#: Regression targets, as event fields: ``incident_energy`` is predicted as log(E / 1 MeV).
REGRESSION_TARGETS = ("incident_energy", "theta")


def regression_values(batch, targets: Sequence[str]) -> Tensor:
    """(B, len(targets)) regression targets of a batch: log(incident energy / MeV), theta (rad)."""
    columns = [torch.log(batch.incident_energy) if name == "incident_energy" else batch[name] for name in targets]
    return torch.stack([column.float().reshape(-1) for column in columns], 1)


def log_visible_energy(batch) -> Tensor:
    """(B, 1) log of each event's summed point energy (MeV, floored at 1 keV)."""
    total = torch.zeros(int(batch.num_graphs), device=batch.energy.device).index_add(
        0, batch.batch, batch.energy.float())
    return torch.log(total.clamp_min(1e-3))[:, None]


class Regression(DownstreamTask):
    """Args:
        targets: among :data:`REGRESSION_TARGETS`.
        target_mean, target_std: training-set mean and spread of each target and, last, of the
            log visible energy (default 0 and 1); :meth:`fit_options` fits them.
        visible_energy_slope: per target, the starting slope of the standardised target on the
            standardised log visible energy (default 0).
    """

    name = "regression"
    OPTIONS = ("targets", "target_mean", "target_std", "visible_energy_slope")

    def __init__(self, targets: Sequence[str] = ("incident_energy",), target_mean: Optional[Sequence[float]] = None,
                 target_std: Optional[Sequence[float]] = None,
                 visible_energy_slope: Optional[Sequence[float]] = None):
        super().__init__()
        self.targets = list(targets)
        if not self.targets or set(self.targets) - set(REGRESSION_TARGETS):
            raise ValueError(f"regression targets must be among {list(REGRESSION_TARGETS)}, got {self.targets}")
        self.target_mean, self.target_std = as_float_list(target_mean), as_float_list(target_std)
        self.visible_energy_slope = as_float_list(visible_energy_slope)
        n_stats = len(self.targets) + 1
        self.register_buffer("mean", torch.tensor(self.target_mean or [0.0] * n_stats, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(self.target_std or [1.0] * n_stats, dtype=torch.float32))

    def build(self, width: int, hidden: int) -> None:
        n = len(self.targets)
        self.head = mlp_head(width + 1, hidden, n, norm=self.head_norm)
        nn.init.zeros_(self.head[-1].weight)  # start from the calibration alone
        nn.init.zeros_(self.head[-1].bias)
        self.calibration = nn.Linear(1, n)
        with torch.no_grad():
            self.calibration.weight.copy_(torch.tensor(self.visible_energy_slope or [0.0] * n)[:, None])
            self.calibration.bias.zero_()
        # a regression checkpoint from before the calibration path predicts as it did
        load_missing_as_zeros(self, ("calibration.weight", "calibration.bias"))

    def hidden_conditions(self) -> tuple[str, ...]:
        return tuple(self.targets)

    def forward(self, output, batch) -> Tensor:
        visible = ((log_visible_energy(batch) - self.mean[-1]) / self.std[-1]).to(output.pooled.dtype)
        return self.calibration(visible) + self.head(torch.cat([output.pooled, visible], 1))

    def labels(self, batch) -> Tensor:
        return (regression_values(batch, self.targets) - self.mean[:-1]) / self.std[:-1]

    def loss(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.mse_loss(outputs, labels)

    def _physical(self, values: Tensor) -> Tensor:
        return torch.stack([values[:, i].exp() if name == "incident_energy" else values[:, i]
                            for i, name in enumerate(self.targets)], 1)

    def predict(self, outputs: Tensor, batch) -> dict[str, Tensor]:
        values = outputs * self.std[:-1] + self.mean[:-1]
        return {"prediction": self._physical(values), "truth": self._physical(regression_values(batch, self.targets))}

    def metrics(self, prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Per target: ``incident_energy/resolution`` = std((E_pred - E) / E) and ``.../bias`` =
        mean((E_pred - E) / E); ``theta/resolution`` = std(theta_pred - theta), ``theta/bias``
        its mean (radians)."""
        metrics = {}
        for i, name in enumerate(self.targets):
            error = prediction[:, i] - truth[:, i]
            if name == "incident_energy":
                error = error / truth[:, i]
            metrics[f"{name}/resolution"] = float(np.std(error))
            metrics[f"{name}/bias"] = float(np.mean(error))
        return metrics

    def check_label(self, item, index: int) -> int:
        """Events with an unknown (NaN) target are left out (-1)."""
        from pcfm.engine.data import pretraining_item

        values = regression_values(pretraining_item(item, int(index)), self.targets)
        return 0 if bool(torch.isfinite(values).all()) else -1

    def fit_options(self, events: Sequence) -> dict[str, Any]:
        """Mean and spread of each target and of the log visible energy (``target_mean``,
        ``target_std``), and the least-squares slope of each standardised target on the
        standardised log visible energy (``visible_energy_slope``: their correlation; 0 with
        fewer than 2 events)."""
        from torch_geometric.data import Batch

        batch = Batch.from_data_list(list(events))
        values = torch.cat([regression_values(batch, self.targets), log_visible_energy(batch)], 1).double()
        std = values.std(0) if len(values) > 1 else torch.ones(values.shape[1], dtype=values.dtype)
        std = std.clamp_min(1e-6)
        standard = (values - values.mean(0)) / std
        slope = (standard[:, :-1] * standard[:, -1:]).sum(0) / max(len(values) - 1, 1)
        return {"target_mean": values.mean(0).tolist(), "target_std": std.tolist(),
                "visible_energy_slope": slope.tolist() if len(values) > 1 else [0.0] * len(self.targets)}
