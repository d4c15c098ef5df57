"""A helper for the reward tests: RewardInputs from texts, with lengths defaulting to the text lengths."""

from __future__ import annotations

import torch

from gspo_lightning.rewards import RewardInputs


def make_inputs(
    completions: list[str],
    answers: list[str | None] | None = None,
    lengths: list[int] | None = None,
    max_new_tokens: int = 64,
) -> RewardInputs:
    n = len(completions)
    lengths = lengths if lengths is not None else [min(len(c), max_new_tokens) for c in completions]
    return RewardInputs(
        prompts=[f"prompt {i}" for i in range(n)],
        completions=list(completions),
        answers=list(answers) if answers is not None else ["57"] * n,
        response_lengths=torch.tensor(lengths, dtype=torch.int64),
        truncated=torch.tensor([length >= max_new_tokens for length in lengths], dtype=torch.bool),
        max_new_tokens=max_new_tokens,
    )
