"""Rollout/trainer mismatch: importance weights pi_old / pi_rollout for tokens sampled by another engine.

A rollout engine (vLLM) samples from ``pi_rollout``, which differs from the trainer's ``pi_old`` even
with identical weights (precision, kernels, batch shapes). The policy gradient is then off-policy by
the factor ``w = pi_old / pi_rollout``; Yao et al. 2025, "Your efficient RL framework secretly brings
you off-policy RL training" (fengyao.notion.site/off-policy-rl), correct it with truncated importance
sampling (TIS), the per-token loss multiplied by a detached, capped weight:

    w_it = min(exp(old_it - rollout_it), C)                                         (token TIS)

IcePop (Ling team) and Liu et al. 2025, "When Speed Kills Stability", mask instead of truncating
(MIS): a token, or a whole sequence, whose weight leaves ``[C_low, C]`` is dropped from the gradient:

    w_it = exp(old_it - rollout_it) * 1[C_low <= exp(old_it - rollout_it) <= C]      (token MIS)

IcePop (Ling team, Ring-1T, arXiv 2510.18855) is token MIS with bounds ``[0.5, 5]``.

At sequence level the weight is the product of the token ratios, ``w_i = exp(sum_t m_it (old_it -
rollout_it))``, broadcast to the sequence's tokens; ``geometric`` uses the length-normalised
``exp(mean_t ...)``, the same normalisation as GSPO's sequence ratio, so that the bound does not depend
on the response length.

Rejection sampling (RS, verl's ``rollout_rs``; Liu, Li et al. 2025, "When Speed Kills Stability") is a
0/1 mask applied on top of (or, with ``mode="none"``, instead of) the weight, at its own level and bounds:

    w_it <- w_it * 1[R_low <= r_it <= R]       r at ``rejection`` level (token / sequence / geometric)  (RS)

A geometric-mean sequence mask (``rejection="geometric"``, bounds close to 1 such as ``[1/1.001, 1.001]``)
drops whole sequences whose average per-token mismatch is large, whatever their length.

Deviations and choices, compared with TRL (``vllm_importance_sampling_mode`` = token/sequence x
truncate/mask, one cap C) and verl (``rollout_is_level`` / ``rollout_is_mode`` / ``rollout_is_threshold``):
truncation caps from above only (as both); masking is two-sided with ``C_low = 1 / C`` by default, as
verl (TRL masks above C only: pass ``threshold_lower=0``); log-weights are clamped to
``[-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND]`` before ``exp`` so weights stay finite (verl's safety bound).

How the module uses it: :class:`~gspo_lightning.components.objective.PolicyObjective` multiplies the
per-token loss by the detached ``weights`` before aggregation (its ``token_weights``), so every aggregation
mode sees the corrected terms. Tokens that mask mode rejects get weight 0 but stay in the loss
denominators, as in TRL (verl leaves them out of the denominator too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

LOG_WEIGHT_BOUND = 20.0  # exp(20) ~ 4.9e8: finite in float32 and far past any useful cap
MismatchLevel = Literal["token", "sequence", "geometric"]
MismatchMode = Literal["truncate", "mask", "none"]


@dataclass
class MismatchOutput:
    """Output of :class:`MismatchCorrection`.

    Attributes:
        weights: (N, T) detached importance weights to multiply the per-token loss by; 0 on padding and on
            masked-out tokens.
        metrics: detached scalars, ``sampling/...``.
    """

    weights: Tensor
    metrics: dict[str, Tensor]


class MismatchCorrection(nn.Module):
    """Truncated or masked importance weights ``pi_old / pi_rollout``, per token or per sequence.

    Args:
        level: ``"token"`` (one weight per token), ``"sequence"`` (the product over the sequence) or
            ``"geometric"`` (the per-token geometric mean over the sequence).
        mode: ``"truncate"`` caps weights at ``threshold`` (TIS); ``"mask"`` zeroes weights outside
            ``[threshold_lower, threshold]`` (MIS); ``"none"``: weight 1 (only the rejection mask applies).
        threshold: the cap C (> 1 for a correction to have room; verl's helpers default to 2, TRL's
            current default is 3).
        threshold_lower: the lower bound of mask mode; None means ``1 / threshold``.
        rejection: level of an extra rejection mask (RS), or None for none.
        rejection_threshold: its upper bound R (None: ``threshold``).
        rejection_threshold_lower: its lower bound (None: ``1 / R``).
    """

    def __init__(
        self,
        level: MismatchLevel = "token",
        mode: MismatchMode = "truncate",
        threshold: float = 2.0,
        threshold_lower: float | None = None,
        rejection: MismatchLevel | None = None,
        rejection_threshold: float | None = None,
        rejection_threshold_lower: float | None = None,
    ) -> None:
        super().__init__()
        levels = ("token", "sequence", "geometric")
        if level not in levels or rejection not in (*levels, None):
            raise ValueError(f"level / rejection must be 'token', 'sequence' or 'geometric': {level!r}, {rejection!r}.")
        if mode not in ("truncate", "mask", "none"):
            raise ValueError(f"mode must be 'truncate', 'mask' or 'none', got {mode!r}.")
        if mode == "none" and rejection is None:
            raise ValueError("mode='none' without a rejection level corrects nothing: set rejection or another mode.")
        self.level, self.mode, self.rejection = level, mode, rejection
        self.threshold_lower, self.threshold = _bounds("threshold", threshold, threshold_lower)
        upper = threshold if rejection_threshold is None else rejection_threshold
        self.rejection_bounds = _bounds("rejection_threshold", upper, rejection_threshold_lower)

    def log_weights(self, diff: Tensor, mask: Tensor, level: MismatchLevel | None = None) -> Tensor:
        """(N, T) log importance weights at ``level`` (default: this correction's), from per-token
        ``old - rollout`` (0 on padding)."""
        level = level or self.level
        if level == "token":
            return diff
        total = diff.sum(-1, keepdim=True)  # (N, 1)
        if level == "geometric":
            total = total / mask.sum(-1, keepdim=True).clamp(min=1).to(diff.dtype)
        return total.expand_as(diff)

    def _ratio(self, diff: Tensor, mask: Tensor, level: MismatchLevel | None = None) -> Tensor:
        return torch.exp(self.log_weights(diff, mask, level).clamp(-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND))

    @torch.no_grad()
    def forward(self, old_logprobs: Tensor, rollout_logprobs: Tensor, response_mask: Tensor) -> MismatchOutput:
        """Weights and metrics for one batch.

        Args:
            old_logprobs: (N, T) the trainer's log pi_old of the sampled tokens.
            rollout_logprobs: (N, T) the rollout engine's log-probs of the same tokens.
            response_mask: (N, T) bool, True on real response tokens.
        """
        mask = response_mask.bool()
        diff = torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), 0.0)
        # a -inf log-prob on either side must give a bounded weight, never NaN
        diff = torch.nan_to_num(diff, nan=0.0, posinf=LOG_WEIGHT_BOUND, neginf=-LOG_WEIGHT_BOUND)
        raw = self._ratio(diff, mask)
        if self.mode == "truncate":
            weights = raw.clamp(max=self.threshold)
            changed = raw > self.threshold
        elif self.mode == "mask":
            inside = (raw >= self.threshold_lower) & (raw <= self.threshold)
            weights = raw * inside
            changed = ~inside
        else:
            weights, changed = torch.ones_like(raw), torch.zeros_like(mask)
        metrics: dict[str, Tensor] = {}
        if self.rejection is not None:
            ratio = self._ratio(diff, mask, self.rejection)
            lower, upper = self.rejection_bounds
            rejected = (ratio < lower) | (ratio > upper)
            weights = weights * ~rejected
            metrics["sampling/rs_rejected_frac"] = (rejected & mask).sum() / mask.sum().clamp(min=1)
        weights = torch.where(mask, weights, 0.0)
        metrics.update(self._metrics(diff, weights, changed, mask))
        return MismatchOutput(weights=weights, metrics=metrics)

    def _metrics(self, diff: Tensor, weights: Tensor, changed: Tensor, mask: Tensor) -> dict[str, Tensor]:
        count = mask.sum().clamp(min=1).float()
        abs_diff = diff.abs().flatten()  # 0 on padding
        zero = abs_diff.new_zeros(1)  # keeps max/min defined for an empty batch
        real_weights = torch.where(mask, weights, torch.inf).flatten()
        weight_min = torch.cat([real_weights, zero + torch.inf]).min()
        frac_name = {"truncate": "sampling/is_clipped_frac", "mask": "sampling/is_masked_frac"}.get(self.mode)
        out = {
            "sampling/logprob_diff_mean": abs_diff.sum() / count,
            "sampling/logprob_diff_max": torch.cat([abs_diff, zero]).max(),
            "sampling/is_weight_mean": weights.sum() / count,
            "sampling/is_weight_max": torch.cat([weights.flatten(), zero]).max(),
            "sampling/is_weight_min": torch.where(torch.isinf(weight_min), 1.0, weight_min),
        }
        if frac_name is not None:
            out[frac_name] = (changed & mask).sum() / count
        return out


def _bounds(name: str, upper: float, lower: float | None) -> tuple[float, float]:
    """``(lower, upper)`` of a weight or rejection interval; ``lower`` None means ``1 / upper``."""
    if upper <= 0:
        raise ValueError(f"{name} must be > 0, got {upper}.")
    if lower is None:
        if upper < 1:
            raise ValueError(
                f"{name}={upper} is below 1: its default lower bound 1 / {name} = {1 / upper:g} would lie above it."
                f" Use {name} >= 1 (a cap on ratios above 1), or give {name}_lower explicitly."
            )
        return 1.0 / upper, upper
    if not 0 <= lower <= upper:
        raise ValueError(f"{name}_lower must be in [0, {name}={upper}], got {lower}.")
    return lower, upper
