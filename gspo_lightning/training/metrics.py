"""What the module logs per rollout batch: weighted means over micro-batches, and the step's summary."""

from __future__ import annotations

import torch
from torch import Tensor

from gspo_lightning.batch import RolloutBatch


class MetricAccumulator:
    """Weighted means of scalar metrics over micro-batches and optimizer steps.

    Names ending in ``_max`` / ``_min`` keep the extreme instead of a mean.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._weights: dict[str, float] = {}

    def add(self, metrics: dict[str, Tensor], weight: float) -> None:
        for name, value in metrics.items():
            value = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
            if name.endswith("_max"):
                self._sums[name] = torch.maximum(self._sums.get(name, value), value)
                self._weights[name] = 1.0
            elif name.endswith("_min"):
                self._sums[name] = torch.minimum(self._sums.get(name, value), value)
                self._weights[name] = 1.0
            else:
                self._sums[name] = self._sums.get(name, torch.zeros(())) + weight * value
                self._weights[name] = self._weights.get(name, 0.0) + weight

    def means(self) -> dict[str, Tensor]:
        return {name: total / max(self._weights[name], 1e-12) for name, total in self._sums.items()}


def step_metrics(batch: RolloutBatch, policy_metrics: dict[str, Tensor], train_s: float, lr: float) -> dict[str, float]:
    """Everything logged once per rollout batch: rollout statistics, policy metrics, timings, throughput.

    ``throughput/tokens_per_s`` is generated (response) tokens over the step's generation + training time.
    """
    generate_s = batch.metrics.get("time/generate_s", 0.0)
    logged: dict[str, float] = {k: float(v) for k, v in batch.metrics.items()}
    logged.update({k: float(v) for k, v in policy_metrics.items()})
    logged["time/train_s"] = train_s
    logged["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / max(generate_s + train_s, 1e-9)
    logged["rollout/advantage_abs_mean"] = float(batch.advantages.abs().mean())
    logged["policy/lr"] = float(lr)
    return logged
