"""`RolloutDataModule`'s options in typed groups (``data.rollout``, ``data.encoding``, ``data.heldout``).

jsonargparse nests each group under the data module's key (``data.rollout.prompts_per_step``); the prompt
source, rewards, engine and ``data.sampling`` stay where they were. Each default lives on a field here, and
each check on a group's own values runs when the group is built, so a bad value fails at parse time with one
line naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RolloutOptions:
    """The shape of a rollout batch and the prompt order.

    Attributes:
        prompts_per_step: B, prompts per rollout batch over all ranks (split evenly over the data-parallel ranks).
        num_samples: G, completions per prompt (>= 2: advantages are relative to the group).
        dynamic_sampling: DAPO dynamic sampling: replace groups whose rewards are all equal.
        max_sampling_rounds: generation rounds per rollout batch allowed for dynamic sampling.
        seed: seed of the prompt order (reshuffled every pass over the data).
    """

    prompts_per_step: int = 32
    num_samples: int = 8
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts_per_step < 1:
            raise ValueError(f"data.rollout.prompts_per_step must be >= 1, got {self.prompts_per_step}.")
        if self.num_samples < 2:
            raise ValueError(
                f"data.rollout.num_samples={self.num_samples}: G must be >= 2, group-relative advantages need at"
                " least two samples per prompt."
            )
        if self.max_sampling_rounds < 1:
            raise ValueError(f"data.rollout.max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}.")


@dataclass(frozen=True)
class EncodingOptions:
    """How prompts become token ids.

    Attributes:
        max_prompt_length: prompts longer than this many tokens are dropped (with a count) or refused.
        on_overlong: ``drop`` or ``error`` for prompts over ``max_prompt_length``.
        chat_template: apply the tokenizer's chat template (None: when it has one).
        system_prompt: system message put before each prompt by the chat template.
    """

    max_prompt_length: int = 512
    on_overlong: Literal["drop", "error"] = "drop"
    chat_template: bool | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.max_prompt_length < 1:
            raise ValueError(f"data.encoding.max_prompt_length must be >= 1, got {self.max_prompt_length}.")


@dataclass(frozen=True)
class HeldOutOptions:
    """The held-out evaluation (greedy accuracy, sampled accuracy, pass@k).

    Attributes:
        size: evaluate at most this many held-out prompts (None: all the prompt source holds out).
        num_samples: k sampled completions per held-out prompt for sampled accuracy and pass@k (0: greedy only).
        batch_size: held-out prompts per generation call.
    """

    size: int | None = None
    num_samples: int = 4
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.size is not None and self.size < 0:
            raise ValueError(
                f"data.heldout.size={self.size}: give the number of held-out prompts to evaluate (>= 0), or null"
                " for all."
            )
        if self.num_samples < 0:
            raise ValueError(
                f"data.heldout.num_samples={self.num_samples}: give the sampled completions per held-out prompt"
                " (>= 0; 0 evaluates greedy only)."
            )
        if self.batch_size < 1:
            raise ValueError(f"data.heldout.batch_size must be >= 1, got {self.batch_size}.")
