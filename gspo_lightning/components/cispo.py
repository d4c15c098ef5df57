"""CISPO (MiniMax-M1, arXiv 2506.13585), in the clip slot: clip the importance weight, not the token.

    l_it = -sg(clip(r_it, 1 - eps_low, 1 + eps_high)) A_it log pi_theta(y_it)

PPO's min drops a token whose ratio left the range from the gradient; CISPO keeps every token's
REINFORCE gradient ``-A grad log pi`` and only caps the (stop-gradient) weight multiplying it. The paper sets no
lower bound in practice (``eps_low`` large: the default 1.0 makes the lower bound 0, i.e. none) and tunes
``eps_high``; it aggregates by the token mean (``loss.aggregation: token-mean``, as ``configs/algorithms/cispo.yaml``).
Here ``log pi_theta`` enters as the log ratio ``lp - sg(old)``: the same gradient, a loss of 0 on-policy.
"""

from __future__ import annotations

from torch import Tensor

from gspo_lightning.components.clip import CLIPS, Clip, ClipOutput, broadcast_advantages, safe_exp_ratio


@CLIPS.register
class CISPOClip(Clip):
    """CISPO (arXiv 2506.13585): -sg(clip(r, 1-eps_low, 1+eps_high)) A log pi; every token keeps its gradient.

    Args:
        eps_low: the weight is clipped below at ``1 - eps_low`` (1.0: no lower bound, as the paper).
        eps_high: the weight is clipped above at ``1 + eps_high``.
    """

    def __init__(self, eps_low: float = 1.0, eps_high: float = 4.0) -> None:
        super().__init__()
        if not 0.0 <= eps_low <= 1.0:
            raise ValueError(f"CISPOClip needs eps_low in [0, 1], got {eps_low}.")
        if eps_high < 0.0:
            raise ValueError(f"CISPOClip needs eps_high >= 0, got {eps_high}.")
        self.eps_low, self.eps_high = eps_low, eps_high

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        ratio = safe_exp_ratio(log_ratio)
        adv = broadcast_advantages(advantages, ratio)
        low, high = 1.0 - self.eps_low, 1.0 + self.eps_high
        weight = ratio.detach().clamp(low, high)
        return ClipOutput(
            loss=-weight * adv * log_ratio,
            ratio=ratio,
            clipped_low=ratio.detach() < low,
            clipped_high=ratio.detach() > high,
        )
