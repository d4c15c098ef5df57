"""GMPO (Geometric-Mean Policy Optimization, arXiv 2507.20673, its objective), in the clip slot.

GRPO averages token ratios arithmetically, so one outlier ratio moves the objective a lot; GMPO takes their
geometric mean, clipping each token's log ratio first, in log space and with the sign of the advantage (the
PPO min per token), then multiplies by the sequence's advantage:

    c_it = sgn(A_i) min(sgn(A_i) delta_it, sgn(A_i) clip(delta_it, -eps_low, eps_high)),   delta_it = lp - old
    l_i  = -A_i exp((1/L_i) sum_t m_it c_it)

and every token of sequence i carries ``l_i`` (``loss.aggregation: seq-mean-token-mean`` gives the paper's
``(1/G) sum_i``). Its default range ``(e^-0.4, e^0.4)`` is wider than GRPO's ``(0.8, 1.2)``: the geometric mean
moves less than any single token. Pass ``TokenRatio`` (the per-token log ratios); with per-token advantages
``A_i`` is their mean over the sequence, as the authors' code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo_lightning.components.clip import CLIPS, LOG_RATIO_BOUND, Clip, ClipOutput, broadcast_advantages
from gspo_lightning.ops import masked_fill_padding, seq_mean


@CLIPS.register
class GMPOClip(Clip):
    """GMPO (arXiv 2507.20673): -A exp(mean_t of the token log ratios, each PPO-clipped in log space).

    Args:
        eps_low: the lower bound of the log ratio is ``-eps_low`` (0.4 in the paper).
        eps_high: the upper bound of the log ratio is ``eps_high`` (0.4 in the paper).
    """

    def __init__(self, eps_low: float = 0.4, eps_high: float = 0.4) -> None:
        super().__init__()
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"GMPOClip needs eps_low >= 0 and eps_high >= 0, got {eps_low} and {eps_high}.")
        self.eps_low, self.eps_high = eps_low, eps_high

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        mask = torch.ones_like(log_ratio, dtype=torch.bool) if response_mask is None else response_mask.bool()
        delta = masked_fill_padding(log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND), mask)
        adv = seq_mean(broadcast_advantages(advantages, delta), mask)  # (N,)
        sign = torch.sign(adv)[:, None].to(delta.dtype)
        clipped = sign * torch.minimum(sign * delta, sign * delta.clamp(-self.eps_low, self.eps_high))
        log_mean = seq_mean(clipped, mask)  # (N,)
        loss = (-adv * torch.exp(log_mean))[:, None].expand_as(delta)
        return ClipOutput(
            loss=masked_fill_padding(loss, mask),
            ratio=torch.exp(delta),
            clipped_low=(sign < 0) & (delta < -self.eps_low) & mask,
            clipped_high=(sign > 0) & (delta > self.eps_high) & mask,
        )
