"""How a rollout batch is split: mini-batches (one optimizer step each) and micro-batches (one forward each)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gspo_lightning.batch import RolloutBatch


def mini_batch_indices(n: int, mini_batches: int, shuffle: bool, generator: torch.Generator) -> list[Tensor]:
    """Split ``range(n)`` into ``mini_batches`` near-equal index sets (shuffled first when asked).

    Raises:
        ValueError: fewer sequences than mini-batches.
    """
    if n < mini_batches:
        raise ValueError(
            f"A rollout batch of {n} sequences cannot be split into {mini_batches} mini-batches: lower"
            " model.update.mini_batches or raise data.rollout.prompts_per_step / data.rollout.num_samples."
        )
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(torch.tensor_split(order, mini_batches))


def micro_batch_indices(n: int, size: int | None) -> list[Tensor]:
    """Consecutive index sets of at most ``size`` sequences covering ``range(n)`` (None: one set)."""
    return list(torch.split(torch.arange(n), size or max(n, 1)))


def token_budget_indices(prompt_lengths: Tensor, response_lengths: Tensor, budget: int) -> list[Tensor]:
    """Index sets of sequences packed into micro-batches of at most ``budget`` tokens each, padding included.

    Sequences are sorted by length (prompt + response), longest first, and each micro-batch takes as many of
    the next ones as fit in ``budget`` once padded to its widths: ``rows x (longest prompt + longest
    response) <= budget``, the size of the micro-batch trimmed to its own widths (``RolloutBatch.trimmed``:
    prompts left-padded to the longest prompt, responses right-padded to the longest response, at least one
    column). So a micro-batch holds sequences of similar length (little padding once trimmed), its padded size,
    the work and memory of its forward, stays within the budget, and so do its real tokens. A sequence longer
    than the budget gets a micro-batch of its own. One loop step per micro-batch.

    Args:
        prompt_lengths: (n,) real prompt tokens of each sequence.
        response_lengths: (n,) real response tokens of each sequence.
        budget: the most tokens, padding included, a micro-batch holds.
    """
    if budget < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {budget}.")
    order = torch.argsort(prompt_lengths + response_lengths, descending=True, stable=True)
    prompts, responses = prompt_lengths[order].cpu(), response_lengths[order].cpu()
    out, start = [], 0
    while start < len(order):
        # padded size of the micro-batch of the next 1, 2, ... sequences: nondecreasing, so those within the
        # budget are a prefix (at most `budget` rows: every row is at least one column wide)
        window = slice(start, start + budget)
        widths = torch.cummax(prompts[window], 0).values + torch.cummax(responses[window], 0).values.clamp(min=1)
        padded = torch.arange(1, len(widths) + 1) * widths
        count = max(int((padded <= budget).sum()), 1)
        out.append(order[start : start + count])
        start += count
    return out


def micro_batches(
    batch: RolloutBatch, size: int | None = None, tokens: int | None = None, agree: Callable[[int], int] | None = None
) -> list[tuple[Tensor, RolloutBatch]]:
    """The micro-batches of ``batch`` with their sequence indices, each trimmed to its own widths.

    Args:
        batch: a mini-batch (or the whole rollout batch, for the no-grad passes).
        size: sequences per micro-batch (None: all), when ``tokens`` is None.
        tokens: the token budget of a micro-batch, padding included: rows x (its longest prompt + its longest
            response) (:func:`token_budget_indices`); overrides ``size``.
        agree: returns the largest micro-batch count over the data-parallel ranks (a collective). Sharded
            forwards (FSDP2) are collectives, so every rank must run as many: a rank with fewer splits its
            largest micro-batches in two until it has that many.
    """
    if tokens is not None:
        prompts = batch.attention_mask[:, : batch.prompt_width].sum(-1)
        index = token_budget_indices(prompts, batch.response_spans, tokens)
    else:
        index = micro_batch_indices(len(batch), size)
    target = agree(len(index)) if agree is not None else len(index)
    while len(index) < target:
        largest = max(range(len(index)), key=lambda i: len(index[i]))
        if len(index[largest]) < 2:
            break
        index[largest : largest + 1] = list(torch.tensor_split(index[largest], 2))
    return [(i, batch.select(i).trimmed()) for i in index]
