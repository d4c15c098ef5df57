"""Format rewards: does the completion follow a required layout?"""

from __future__ import annotations

import re
from typing import Literal

from gspo_lightning.rewards.base import REWARDS, Reward


@REWARDS.register
class RegexFormatReward(Reward):
    """Format reward: ``match_score`` when the completion matches a regular expression, else ``miss_score``.

    The format reward of DeepSeek-R1 (arXiv 2501.12948 §2.2.2), e.g. reasoning inside ``<think>`` tags:
    ``pattern="(?s)^<think>.*</think>.*$"``. Use inline flags (``(?s)`` so ``.`` matches newlines,
    ``(?i)`` to ignore case) for regex options.

    Args:
        pattern: a Python regular expression.
        match_score: score of a matching completion.
        miss_score: score of a non-matching completion.
        mode: ``"search"`` (the pattern occurs anywhere) or ``"fullmatch"`` (the whole completion).
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call, which then runs on a worker thread; None for none (see
            :class:`~gspo_lightning.rewards.base.Reward`).

    Raises:
        ValueError: ``pattern`` is not a valid regular expression, or ``mode`` is unknown.
    """

    def __init__(
        self,
        pattern: str,
        match_score: float = 1.0,
        miss_score: float = 0.0,
        mode: Literal["search", "fullmatch"] = "search",
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name, timeout_s)
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"RegexFormatReward mode must be 'search' or 'fullmatch', got {mode!r}.")
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"RegexFormatReward: invalid regular expression {pattern!r}: {e}") from e
        self.pattern = pattern
        self.match_score = float(match_score)
        self.miss_score = float(miss_score)
        self.mode = mode

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        matcher = self.regex.search if self.mode == "search" else self.regex.fullmatch
        return self.match_score if matcher(completion) else self.miss_score
