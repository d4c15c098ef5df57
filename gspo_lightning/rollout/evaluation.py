"""Held-out evaluation results and the accuracy figures made from them.

The data module produces :class:`EvalResult`s (greedy and sampled completions of held-out prompts, scored
for correctness); the module's ``validation_step`` logs :func:`eval_metrics` of each, and
``HeldOutReport`` sums them over every rank with :func:`heldout_accuracy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EvalResult:
    """Held-out evaluation of n prompts: greedy and k sampled completions each, scored for correctness.

    Attributes:
        greedy_correct: (n,) bool.
        sampled_correct: (n, k) bool (k may be 0).
        epoch: passes over the training prompts when it ran (``RolloutDataModule.prompt_epochs``).
    """

    greedy_correct: Tensor
    sampled_correct: Tensor
    epoch: float = 0.0

    def __len__(self) -> int:
        return self.greedy_correct.shape[0]


def eval_metrics(result: EvalResult) -> dict[str, Tensor]:
    """``val/*`` metrics of one held-out batch: greedy accuracy, sampled accuracy and pass@k; and ``epoch``, the
    passes over the training prompts (the column Lightning would fill with its always-0 loop epoch)."""
    metrics = {"val/accuracy": result.greedy_correct.float().mean(), "epoch": torch.tensor(float(result.epoch))}
    k = result.sampled_correct.shape[1]
    if k > 0:
        metrics["val/accuracy_sampled"] = result.sampled_correct.float().mean()
        metrics[f"val/pass@{k}"] = result.sampled_correct.any(1).float().mean()
    return metrics


def heldout_accuracy(results: Iterable[EvalResult], reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """Greedy and sampled accuracy over every held-out prompt of every rank.

    Args:
        results: this rank's evaluations.
        reduce_sum: sums a tensor over the data-parallel ranks (``strategy.reduce(x, reduce_op="sum")``); a
            collective, so every rank must call this function.

    Returns:
        ``val/accuracy``, ``val/accuracy_sampled`` and ``n``, the number of prompts evaluated.
    """
    totals = torch.zeros(3, dtype=torch.float64)
    for r in results:
        sampled = r.sampled_correct.float().mean(1).sum() if r.sampled_correct.shape[1] else torch.zeros(())
        totals += torch.stack([r.greedy_correct.sum().double(), sampled.double(), torch.tensor(float(len(r)))])
    totals = reduce_sum(totals)
    n = max(float(totals[2]), 1.0)
    return {"val/accuracy": float(totals[0]) / n, "val/accuracy_sampled": float(totals[1]) / n, "n": float(totals[2])}
