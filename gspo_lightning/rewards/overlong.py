"""Length shaping: DAPO's soft overlong punishment."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs


@REWARDS.register
class OverlongPenalty(Reward):
    """DAPO soft overlong punishment: a penalty rising linearly to -penalty over the last buffer tokens.

    DAPO (arXiv 2503.14476 §3.4, eq. 13), with L_max = ``max_new_tokens``, L_cache = ``buffer`` and
    L the response length in tokens::

        R(L) = 0                                   if L <= L_max - L_cache
             = (L_max - L_cache - L) / L_cache     if L_max - L_cache < L < L_max
             = -1                                  if L >= L_max

    scaled by ``penalty``. DAPO uses L_max = 20480 and L_cache = 4096. Add it to a correctness reward
    (its own best score is 0).

    Args:
        max_new_tokens: L_max; None uses the generation limit of the inputs.
        buffer: L_cache, the length of the punishment interval, ``0 <= buffer < L_max``; None uses
            ``L_max // 5`` (DAPO's 4096 / 20480). With 0 the penalty is a step at L_max.
        penalty: the magnitude of the penalty at L_max, >= 0.
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call, which then runs on a worker thread; None for none (see
            :class:`~gspo_lightning.rewards.base.Reward`).

    Raises:
        ValueError: invalid arguments (also when called, if ``buffer`` does not fit the inputs' limit).
    """

    def __init__(
        self,
        max_new_tokens: int | None = None,
        buffer: int | None = None,
        penalty: float = 1.0,
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name, timeout_s)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"OverlongPenalty max_new_tokens must be >= 1, got {max_new_tokens}.")
        if buffer is not None and buffer < 0:
            raise ValueError(f"OverlongPenalty buffer must be >= 0, got {buffer}.")
        if not (math.isfinite(penalty) and penalty >= 0.0):
            raise ValueError(f"OverlongPenalty penalty must be finite and >= 0, got {penalty}.")
        self.max_new_tokens = max_new_tokens
        self.buffer = buffer
        self.penalty = float(penalty)
        if max_new_tokens is not None:
            self.limits(max_new_tokens)

    def limits(self, generation_limit: int) -> tuple[int, int]:
        """``(L_max, L_cache)`` for a generation limit, validated."""
        l_max = self.max_new_tokens if self.max_new_tokens is not None else generation_limit
        l_cache = self.buffer if self.buffer is not None else l_max // 5
        if l_cache >= l_max:
            raise ValueError(
                f"OverlongPenalty buffer ({l_cache}) must be smaller than max_new_tokens ({l_max}): the "
                "penalty ramps over the last `buffer` tokens before the limit."
            )
        return l_max, l_cache

    def score(self, inputs: RewardInputs) -> Tensor:
        l_max, l_cache = self.limits(inputs.max_new_tokens)
        length = inputs.response_lengths.to(torch.float32)
        ramp = (l_max - l_cache - length) / max(l_cache, 1)
        scaled = torch.where(length >= l_max, -1.0, ramp.clamp(-1.0, 0.0))
        return scaled * self.penalty
