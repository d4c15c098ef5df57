"""How a rollout batch is split: mini-batches (one optimizer step each) and micro-batches (one forward each)."""

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


def micro_batch_indices(n: int, size: int | None) -> list[Tensor]:
    """Consecutive index sets of at most ``size`` sequences covering ``range(n)`` (None: one set)."""
    return list(torch.split(torch.arange(n), size or max(n, 1)))
