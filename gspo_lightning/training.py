"""Small helpers of the training step: mini-batch splits and metric averaging."""

from __future__ import annotations

import random
from typing import Any

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


def rng_states() -> dict[str, Any]:
    """The RNG states a resumed run needs to continue the same random streams."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def step_metrics(batch, policy_metrics: dict[str, Tensor], train_s: float, lr: float) -> dict[str, float]:
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


def correct_mismatch(batch, correction) -> None:
    """Log the rollout engine's log-prob gap to pi_old and, with a correction, set ``batch.is_weights``.

    Needs both the trainer's pi_old and the engine's log-probs; does nothing otherwise.
    """
    if batch.rollout_logprobs is None or batch.old_logprobs is None:
        return
    if correction is not None:
        out = correction(batch.old_logprobs, batch.rollout_logprobs, batch.response_mask)
        batch.is_weights = out.weights
        batch.metrics.update({k: float(v) for k, v in out.metrics.items()})
        return
    gap = (batch.old_logprobs - batch.rollout_logprobs).abs()[batch.response_mask]
    if gap.numel():
        batch.metrics["sampling/logprob_diff_mean"] = float(gap.mean())
        batch.metrics["sampling/logprob_diff_max"] = float(gap.max())


def eval_metrics(result) -> dict[str, Tensor]:
    """``val/*`` metrics of one held-out batch: greedy accuracy, sampled accuracy and pass@k."""
    metrics = {"val/accuracy": result.greedy_correct.float().mean()}
    k = result.sampled_correct.shape[1]
    if k > 0:
        metrics["val/accuracy_sampled"] = result.sampled_correct.float().mean()
        metrics[f"val/pass@{k}"] = result.sampled_correct.any(1).float().mean()
    return metrics
