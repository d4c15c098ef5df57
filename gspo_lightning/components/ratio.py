"""Importance ratios, returned per token in log space.

Notation (``docs/algorithms.md#notation``): ``delta = lp - old``, ``m`` the response mask,
``L_i = sum_t m_it``, ``sg`` = stop-gradient. Every ratio returns a (N, T) log ratio that is 0 at padding,
so padding never changes a result, and a -inf log-prob at padding cannot produce NaN. The equations, with
their gradients: ``docs/algorithms.md#ratios``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from gspo_lightning.ops import masked_fill_padding, seq_lengths, seq_sum
from gspo_lightning.registry import Registry


class Ratio(nn.Module, ABC):
    """Base class: per-token log importance ratio ``log r`` of the current policy against pi_old."""

    @abstractmethod
    def forward(self, logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
        """Return the (N, T) log ratio.

        Args:
            logprobs: (N, T) log pi_theta of the sampled tokens (carries the gradient).
            old_logprobs: (N, T) log pi_old of the same tokens (no gradient needed).
            response_mask: (N, T) bool, True on real response tokens.
        """


RATIOS: Registry[Ratio] = Registry("ratio", Ratio)


def _delta(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    mask = mask.bool()
    return masked_fill_padding(logprobs, mask) - masked_fill_padding(old_logprobs.detach(), mask)


@RATIOS.register
class TokenRatio(Ratio):
    """Token-level ratio of PPO/GRPO: log r_it = lp_it - old_it."""

    def forward(self, logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
        return _delta(logprobs, old_logprobs, response_mask)


@RATIOS.register
class SequenceRatio(Ratio):
    """GSPO sequence ratio (arXiv 2507.18071, eq. 7): log s_i = (1/L_i) sum_t m_it delta_it, per token.

    The length-normalised ratio is the geometric mean of the token ratios, so it does not grow or shrink
    with the response length. ``length_normalize=False`` gives the un-normalised full-sequence ratio
    ``sum_t delta_it`` (the right quantity for a rollout/trainer mismatch correction); it is not what the
    GSPO paper optimises (``docs/algorithms.md#where-popular-write-ups-go-wrong``).

    Args:
        length_normalize: divide the summed log ratio by the response length ``L_i``.
    """

    def __init__(self, length_normalize: bool = True) -> None:
        super().__init__()
        self.length_normalize = length_normalize

    def sequence_log_ratio(self, logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
        """The (N,) sequence log ratio ``log s_i`` (0 for an empty response)."""
        mask = response_mask.bool()
        total = seq_sum(_delta(logprobs, old_logprobs, mask), mask)
        if self.length_normalize:
            total = total / seq_lengths(mask).clamp(min=1.0).to(total.dtype)
        return total

    def forward(self, logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
        log_s = self.sequence_log_ratio(logprobs, old_logprobs, response_mask)
        return masked_fill_padding(log_s[:, None].expand_as(logprobs), response_mask.bool())


@RATIOS.register
class SequenceTokenRatio(SequenceRatio):
    """GSPO-token ratio (arXiv 2507.18071, eq. 13): log s_it = sg(log s_i) + lp_it - sg(lp_it).

    Its value equals the GSPO sequence ratio; its gradient equals GSPO's when the advantage is constant
    within a sequence, and it lets each token carry its own advantage.
    """

    def forward(self, logprobs: Tensor, old_logprobs: Tensor, response_mask: Tensor) -> Tensor:
        mask = response_mask.bool()
        log_s = self.sequence_log_ratio(logprobs, old_logprobs, mask).detach()
        lp = masked_fill_padding(logprobs, mask)
        return masked_fill_padding(log_s[:, None] + lp - lp.detach(), mask)
