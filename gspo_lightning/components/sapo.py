"""SAPO's soft gate (Soft Adaptive Policy Optimization, Qwen, arXiv 2511.20347), in the clip slot.

Instead of cutting the gradient off outside a trust region, SAPO multiplies the advantage by a smooth function
of the ratio (the paper's objective, written as a loss):

    l_it = -f_it(r_it) A_it,      f_it(r) = (4 / tau_it) sigmoid(tau_it (r - 1)),
    tau_it = tau_pos if A_it > 0 else tau_neg

so ``d l / d theta = -w(r) r A grad log pi`` with ``w(r) = 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1)))``:
``w(1) = 1`` (on-policy it is the plain policy gradient) and ``w`` decays smoothly as r leaves 1, faster for a
larger tau. ``tau_neg > tau_pos`` damps negative-advantage tokens sooner (their large-ratio gradients spread
probability over the whole vocabulary). With ``TokenRatio`` this is the paper's SAPO; with ``SequenceRatio``
every token shares the sequence's gate, the sequence-level limit the paper derives SAPO's "sequence coherence"
from (``docs/algorithms.md#sapo``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gspo_lightning.components.clip import CLIPS, Clip, ClipOutput, broadcast_advantages, no_clipping, safe_exp_ratio


@CLIPS.register
class SAPOGate(Clip):
    """SAPO soft gate (arXiv 2511.20347): -(4/tau) sigmoid(tau (r - 1)) A, tau by the advantage's sign.

    Args:
        tau_pos: the gate's temperature for A > 0 (1.0, as TRL and verl default).
        tau_neg: the gate's temperature for A <= 0 (1.05, as TRL and verl default).
    """

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05) -> None:
        super().__init__()
        if tau_pos <= 0 or tau_neg <= 0:
            raise ValueError(f"SAPOGate needs tau_pos > 0 and tau_neg > 0, got {tau_pos} and {tau_neg}.")
        self.tau_pos, self.tau_neg = tau_pos, tau_neg

    def forward(self, log_ratio: Tensor, advantages: Tensor, response_mask: Tensor | None = None) -> ClipOutput:
        ratio = safe_exp_ratio(log_ratio)
        adv = broadcast_advantages(advantages, ratio)
        tau = torch.where(adv > 0, self.tau_pos, self.tau_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        return ClipOutput(
            loss=-gate * adv, ratio=ratio, clipped_low=no_clipping(ratio), clipped_high=no_clipping(ratio)
        )
