"""Clipped surrogate objectives, per token, written as losses to minimise.

Every clip receives a log ratio and clamps it to ``[-LOG_RATIO_BOUND, LOG_RATIO_BOUND]`` (= +-20) before
``exp``: exp(20) ~ 4.9e8 is finite in float32 and bfloat16, so a log ratio of +-100 (a diverged policy or
a -inf log-prob) gives a finite loss. It is a safety cut-off, not part of the objective: outside the bound
the gradient is zero, which clipping alone would not give: for A < 0 above ``1 + eps_high`` the min keeps
the unclipped term ``-A r``, whose gradient grows with r, and ``NoClip`` has no bound at all. Inside the
bound it changes nothing (``docs/algorithms.md#clipping``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gspo_lightning.registry import Registry

LOG_RATIO_BOUND = 20.0


@dataclass
class ClipOutput:
    """What a clip returns.

    Attributes:
        loss: (N, T) per-token surrogate loss (to be minimised), before aggregation.
        ratio: (N, T) the importance ratio ``exp(clamp(log r))`` that entered the loss.
        clipped_low: (N, T) bool, the lower bound acted (A < 0 and r < 1 - eps_low): no gradient.
        clipped_high: (N, T) bool, an upper bound acted (A > 0 and r > 1 + eps_high, or dual-clip's cap).
    """

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor

    @property
    def clipped(self) -> Tensor:
        return self.clipped_low | self.clipped_high


def broadcast_advantages(advantages: Tensor, like: Tensor) -> Tensor:
    """(N,) or (N, T) advantages as (N, T), detached: advantages never carry a gradient."""
    adv = advantages.detach().to(like.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    return adv.expand_as(like)


def safe_exp_ratio(log_ratio: Tensor) -> Tensor:
    """``exp(clamp(log_ratio, -20, 20))``, see the module docstring for the bound."""
    return torch.exp(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))


class Clip(nn.Module, ABC):
    """Base class: turn a per-token log ratio and advantages into a per-token loss."""

    @abstractmethod
    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        """Args: log_ratio (N, T); advantages (N,) or (N, T); response_mask (N, T) bool, for surrogates that
        reduce over a sequence (GMPO); None means every position is real."""


CLIPS: Registry[Clip] = Registry("clip", Clip)


def no_clipping(like: Tensor) -> Tensor:
    """An all-False (N, T) flag: no bound acted."""
    return torch.zeros_like(like, dtype=torch.bool)


@CLIPS.register
class PPOClip(Clip):
    """PPO clipped surrogate, -min(r A, clip(r, 1-eps_low, 1+eps_high) A); DAPO clip-higher when asymmetric.

    PPO (arXiv 1707.06347, eq. 7) with the asymmetric range of DAPO (arXiv 2503.14476, eq. 10). GSPO uses
    eps_low=3e-4, eps_high=4e-4 on its sequence ratio; GRPO 0.2/0.2; DAPO 0.2/0.28.

    Args:
        eps_low: lower range, r is clipped at ``1 - eps_low``.
        eps_high: upper range, r is clipped at ``1 + eps_high``.
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2) -> None:
        super().__init__()
        if not 0.0 <= eps_low <= 1.0:
            raise ValueError(f"eps_low must be in [0, 1] (1: no lower bound), got {eps_low}.")
        if eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {eps_high}.")
        self.eps_low = eps_low
        self.eps_high = eps_high

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        ratio = safe_exp_ratio(log_ratio)
        adv = broadcast_advantages(advantages, ratio)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - self.eps_low, 1.0 + self.eps_high)
        loss = torch.maximum(unclipped, clipped)
        return ClipOutput(
            loss=loss,
            ratio=ratio,
            clipped_low=(adv < 0) & (ratio < 1.0 - self.eps_low),
            clipped_high=(adv > 0) & (ratio > 1.0 + self.eps_high),
        )


@CLIPS.register
class DualClip(PPOClip):
    """Dual-clip PPO (arXiv 1912.09729, eq. 5): for A < 0 the loss is also capped at -c A.

    Without the cap, a negative-advantage token whose ratio has grown large gets an unbounded loss.

    Args:
        eps_low: lower PPO range.
        eps_high: upper PPO range.
        c: the cap factor, > 1 (usually 3).
    """

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2, c: float = 3.0) -> None:
        super().__init__(eps_low, eps_high)
        if c <= 1.0:
            raise ValueError(f"DualClip needs c > 1, got {c}.")
        self.c = c

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        out = super().forward(log_ratio, advantages, response_mask)
        adv = broadcast_advantages(advantages, out.ratio)
        cap = -self.c * adv
        capped = (adv < 0) & (out.loss > cap)
        out.loss = torch.where(capped, cap, out.loss)
        out.clipped_high = out.clipped_high | capped
        return out


@CLIPS.register
class NoClip(Clip):
    """No clipping: the importance-weighted policy gradient loss -r A."""

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        ratio = safe_exp_ratio(log_ratio)
        adv = broadcast_advantages(advantages, ratio)
        return ClipOutput(
            loss=-adv * ratio, ratio=ratio, clipped_low=no_clipping(ratio), clipped_high=no_clipping(ratio)
        )
