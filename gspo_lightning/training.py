"""Small helpers of the training step: mini-batch splits and metric averaging."""

from __future__ import annotations

import torch
from torch import Tensor


def mini_batch_indices(n: int, mini_batches: int, shuffle: bool, generator: torch.Generator) -> list[Tensor]:
    """Split ``range(n)`` into ``mini_batches`` near-equal index sets (shuffled first when asked).

    Raises:
        ValueError: fewer sequences than mini-batches.
    """
    if n < mini_batches:
        raise ValueError(
            f"A rollout batch of {n} sequences cannot be split into {mini_batches} mini-batches: lower"
            " model.mini_batches or raise data.prompts_per_step / data.num_samples."
        )
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(torch.tensor_split(order, mini_batches))


class MetricAccumulator:
    """Weighted means of scalar metrics over micro-batches and optimizer steps."""

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
