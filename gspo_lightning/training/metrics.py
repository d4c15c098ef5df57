"""What the module logs per rollout batch: policy metrics over every micro-batch and rank, and the summary.

Logged values do not depend on how a rollout batch is split over micro-batches and ranks:

- ``policy/loss`` and ``policy/pg_loss`` are *shares*: each micro-batch's loss is normalised by its
  mini-batch's global counts, so the shares of all micro-batches and ranks add up to the mini-batch loss.
  They are summed over micro-batches and ranks, then averaged over the optimizer steps.
- ``*_max`` / ``*_min`` keep the extreme over everything.
- every other metric is a mean over the micro-batches of every rank, weighted by real response tokens
  (sequence-level metrics, :data:`SEQUENCE_METRICS`, by sequences with a response); ``policy/grad_norm``,
  one value per optimizer step, by steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gspo_lightning.batch import RolloutBatch

SHARE_METRICS = frozenset({"policy/loss", "policy/pg_loss"})
SEQUENCE_METRICS = frozenset({"policy/clip_frac_seq", "moe/aux_loss"})

Reduce = Callable[[Tensor, str], Tensor]
"""Reduces a tensor over the data-parallel ranks with ``"sum"``, ``"max"`` or ``"min"`` (a collective)."""


def _no_ranks(tensor: Tensor, op: str) -> Tensor:
    return tensor


class MetricAccumulator:
    """Accumulates the update's metrics of one rollout batch (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._max: dict[str, float] = {}
        self._min: dict[str, float] = {}
        self._steps = 0

    def add_micro_batch(self, metrics: dict[str, Tensor], tokens: float, sequences: float) -> None:
        """Add one micro-batch's metrics; ``tokens`` and ``sequences`` are its real response tokens and the
        sequences that have any."""
        for name, value in metrics.items():
            value = float(value)
            if name.endswith("_max"):
                self._max[name] = max(self._max.get(name, value), value)
            elif name.endswith("_min"):
                self._min[name] = min(self._min.get(name, value), value)
            elif name in SHARE_METRICS:
                self._add(name, value, 0.0)
            else:
                self._add(name, value, sequences if name in SEQUENCE_METRICS else tokens)

    def end_step(self, metrics: dict[str, Tensor]) -> None:
        """Close an optimizer step, adding its own metrics (e.g. the gradient norm) once."""
        self._steps += 1
        for name, value in metrics.items():
            self._add(name, float(value), 1.0)

    def _add(self, name: str, value: float, weight: float) -> None:
        # shares carry weight 0 and are divided by the number of steps instead
        self._sums[name] = self._sums.get(name, 0.0) + (value * weight if weight else value)
        self._weights[name] = self._weights.get(name, 0.0) + weight

    def result(self, reduce: Reduce = _no_ranks) -> dict[str, float]:
        """The metrics over every rank (``reduce`` is a collective: every rank calls this)."""
        names = sorted(self._sums)
        totals = reduce(torch.tensor([[self._sums[n], self._weights[n]] for n in names], dtype=torch.float64), "sum")
        out = {}
        for name, (total, weight) in zip(names, totals.reshape(len(names), 2).tolist()):
            out[name] = total / max(self._steps, 1) if name in SHARE_METRICS else total / max(weight, 1e-12)
        for extremes, op in ((self._max, "max"), (self._min, "min")):
            if extremes:
                keys = sorted(extremes)
                values = reduce(torch.tensor([extremes[k] for k in keys], dtype=torch.float64), op)
                out.update(zip(keys, values.tolist()))
        return out


def response_counts(response_mask: Tensor) -> tuple[float, float]:
    """Real response tokens, and sequences with at least one, of a micro-batch: the metric weights."""
    lengths = response_mask.sum(-1)
    return float(lengths.sum()), float((lengths > 0).sum())


def step_metrics(batch: RolloutBatch, policy_metrics: dict[str, float], train_s: float, lr: float) -> dict[str, float]:
    """Everything logged once per rollout batch: rollout statistics, policy metrics, timings, throughput.

    ``throughput/tokens_per_s`` is generated (response) tokens over the step's generation + training time; under
    asynchronous rollouts, over the time the trainer waited for the batch + training time (generation overlapped).
    """
    generate_s = batch.metrics.get("time/wait_for_rollout_s", batch.metrics.get("time/generate_s", 0.0))
    logged: dict[str, float] = {k: float(v) for k, v in batch.metrics.items()}
    logged.update({k: float(v) for k, v in policy_metrics.items()})
    logged["time/train_s"] = train_s
    logged["throughput/tokens_per_s"] = float(batch.response_mask.sum()) / max(generate_s + train_s, 1e-9)
    logged["rollout/advantage_abs_mean"] = float(batch.advantages.abs().mean())
    logged["policy/lr"] = float(lr)
    return logged
