"""Token masks: per-token weights on the policy loss that compose with every objective.

A mask returns, for each response token, a detached weight that multiplies the token's policy loss (0 drops
the token from the gradient, 1 keeps it) and, optionally, a per-token penalty: the coefficient ``c_it`` of
``c_it |lp_it - old_it|`` added to the token's loss before the weights (KL-Cov), or, in the update, a penalty
term with gradient added after them (DPPO's prime-rl KL). Per token, with ``w`` all weights (mismatch
correction included):

    l_it = w_it (clip_it + c_it |lp_it - old_it|) + penalty_it

Masks run at one of two stages (``docs/algorithms.md#token-masks``):

- ``"update"``: inside each micro-batch's loss, from the current policy's log-probs (detached for every
  statistic). Only masks whose statistic is per token or per sequence live here (a sequence is never split), so
  every split gives the whole-batch gradient.
- ``"pre_update"``: once per rollout batch, before any update, from pi_old's log-probs and entropies over the
  whole rollout batch (this rank's). Masks that rank or centre tokens across the batch (forking tokens,
  Clip-Cov, KL-Cov) live here: their selection is then one fixed set whatever the micro-batch split.

Masked tokens stay in the aggregation's denominators, as TRL and verl keep them: the loss is the mean over
all response tokens of the kept tokens' terms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from gspo_lightning.components.aggregation import masked_metric_mean
from gspo_lightning.components.clip import broadcast_advantages
from gspo_lightning.ops import masked_fill_padding, seq_mean
from gspo_lightning.registry import Registry

MaskStage = Literal["pre_update", "update"]


@dataclass
class MaskInputs:
    """What a mask may read; every tensor (N, T), 0 at padding, detached but for ``logprobs`` in the update.

    Attributes:
        logprobs: log-probs of the policy the statistics describe: pi_theta's in the update (with gradient, for a
            penalty: detach it for any statistic), pi_old's before it.
        old_logprobs: pi_old's log-probs (the ratio's denominator).
        advantages: per-token advantages (a sequence's advantage repeated over its tokens).
        response_mask: bool, True on real response tokens.
        rollout_logprobs: the rollout engine's log-probs (the behaviour policy), or None when it reported none.
        entropy: the entropy of ``logprobs``' policy at each position (pre-update masks with ``needs_entropy``).
        response_ids: the sampled token ids (to seed a mask's random choices reproducibly), or None.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    response_mask: Tensor
    rollout_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    response_ids: Tensor | None = None

    @property
    def behaviour_logprobs(self) -> Tensor:
        """The log-probs of the policy that sampled the tokens: the engine's when it reported them, else pi_old."""
        return self.rollout_logprobs if self.rollout_logprobs is not None else self.old_logprobs


@dataclass
class MaskOutput:
    """What a mask returns.

    Attributes:
        weights: (N, T) detached weights multiplying each token's policy loss (0 at padding).
        kl_coef: (N, T) detached coefficient of the penalty ``|lp - old|`` added to each token's loss, or None.
        penalty: (N, T) a per-token loss term with gradient, added after the weights (``update`` stage only), or None.
        metrics: detached scalars named ``policy/<mask>_<name>``.
    """

    weights: Tensor
    kl_coef: Tensor | None = None
    penalty: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)


class TokenMask(nn.Module, ABC):
    """Base class: per-token weights (and an optional ``|lp - old|`` penalty) on the policy loss."""

    stage: ClassVar[MaskStage] = "update"
    needs_entropy: ClassVar[bool] = False

    @abstractmethod
    def forward(self, inputs: MaskInputs) -> MaskOutput:
        """Return the mask of one (micro-)batch (``update`` stage) or rollout batch (``pre_update`` stage)."""


MASKS: Registry[TokenMask] = Registry("token mask", TokenMask)


def dropped_frac(keep: Tensor, mask: Tensor) -> Tensor:
    """Share of real tokens a 0/1 ``keep`` drops."""
    return masked_metric_mean((~keep.bool()).float(), mask)


@MASKS.register
class OffPolicySequenceMask(TokenMask):
    """OPSM (DeepSeek-V3.2, arXiv 2512.02556): drop negative-advantage sequences far from the behaviour policy.

    ``M_it = 0 if A_it < 0 and (1/L_i) sum_t m_it (log pi_b(y_it) - log pi_theta(y_it)) > delta, else 1``,
    with ``pi_b`` the policy that sampled (the engine's log-probs when it reports them, else pi_old) and
    ``pi_theta`` the current policy, detached. The divergence is the sampled-token estimate of
    ``KL(pi_b || pi_theta)`` per token; positive-advantage sequences are never masked.

    Args:
        delta: the divergence threshold (nats per token); the paper publishes none, so it has no default.
    """

    stage: ClassVar[MaskStage] = "update"

    def __init__(self, delta: float) -> None:
        super().__init__()
        if delta < 0:
            raise ValueError(f"OffPolicySequenceMask needs delta >= 0, got {delta}.")
        self.delta = delta

    def forward(self, inputs: MaskInputs) -> MaskOutput:
        mask = inputs.response_mask.bool()
        gap = masked_fill_padding(inputs.behaviour_logprobs - inputs.logprobs.detach(), mask)
        divergence = seq_mean(gap, mask)  # (N,)
        far = divergence[:, None] > self.delta
        keep = ~((inputs.advantages < 0) & far) & mask
        return MaskOutput(
            weights=keep.to(inputs.logprobs.dtype),
            metrics={
                "policy/opsm_masked_frac": dropped_frac(keep, mask),
                "policy/opsm_divergence_mean": masked_metric_mean(divergence[:, None].expand_as(gap), mask),
            },
        )


DivergenceKind = Literal["tv", "kl"]


@MASKS.register
class DivergenceMask(TokenMask):
    """DPPO (arXiv 2602.04879, eq. 11-14): drop tokens whose probability moved past a divergence trust region.

    With ``p = pi_theta(y_it)`` (detached) and ``q = pi_old(y_it)`` (the ratio's anchor: the engine's policy mu
    under ``model.update.old_logprobs: rollout``, as the paper recommends), the binary divergence of the
    two-outcome distributions {sampled token, the rest} is ``D = |p - q|`` (``tv``) or
    ``q log(q/p) + (1-q) log((1-q)/(1-p))`` (``kl``, KL(mu || pi)), and a token is dropped only when it exceeds
    its threshold while moving the way its advantage pushes:

        M_it = 0 if (A_it > 0, p > q, D > delta_high) or (A_it <= 0, p < q, D > delta_low), else 1

    Compose with ``TokenRatio`` and ``NoClip`` (the paper's ``sum_t M_t r_t A_t``, no ratio clipping). ``kl_coef``
    adds prime-rl's penalty ``kl_coef (lp - old)^2`` on every token, masked or not (its default loss: 1e-3).

    Args:
        divergence: ``tv`` (binary total variation) or ``kl`` (binary KL).
        delta_low: threshold for tokens whose probability falls (A <= 0).
        delta_high: threshold for tokens whose probability rises (A > 0).
        kl_coef: weight of the squared log-ratio penalty (0: none).
    """

    stage: ClassVar[MaskStage] = "update"

    def __init__(
        self, divergence: DivergenceKind = "tv", delta_low: float = 0.15, delta_high: float = 0.15, kl_coef: float = 0.0
    ) -> None:
        super().__init__()
        if divergence not in ("tv", "kl"):
            raise ValueError(f"DivergenceMask divergence must be 'tv' or 'kl', got {divergence!r}.")
        if delta_low < 0 or delta_high < 0 or kl_coef < 0:
            raise ValueError(
                f"DivergenceMask needs delta_low, delta_high, kl_coef >= 0, got {delta_low}, {delta_high}, {kl_coef}."
            )
        self.divergence, self.delta_low, self.delta_high, self.kl_coef = divergence, delta_low, delta_high, kl_coef

    def binary_divergence(self, logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
        """(N, T) the divergence D between the two-outcome distributions of pi_old (q) and pi_theta (p)."""
        lp, old = logprobs.detach().double().clamp(max=0.0), old_logprobs.detach().double().clamp(max=0.0)
        p, q = lp.exp(), old.exp()
        if self.divergence == "tv":
            return (p - q).abs()
        # the rest's term vanishes where q = 1; log(1 - p) is floored so that p = 1 gives a huge, finite D
        rest = (1.0 - q) * (torch.log1p(-q).clamp(min=-700.0) - torch.log1p(-p).clamp(min=-700.0))
        return q * (old - lp) + torch.where(q < 1.0, rest, torch.zeros_like(rest))

    def forward(self, inputs: MaskInputs) -> MaskOutput:
        mask = inputs.response_mask.bool()
        lp, old, adv = inputs.logprobs, inputs.old_logprobs, inputs.advantages
        div = self.binary_divergence(lp, old)
        rises = lp.detach() > old
        falls = lp.detach() < old
        out = ((adv > 0) & rises & (div > self.delta_high)) | ((adv <= 0) & falls & (div > self.delta_low))
        keep = mask & ~out
        penalty = None
        if self.kl_coef > 0:
            penalty = masked_fill_padding(self.kl_coef * (lp - old.detach()).square(), mask)
        return MaskOutput(
            weights=keep.to(lp.dtype),
            penalty=penalty,
            metrics={
                "policy/dppo_masked_frac": dropped_frac(keep, mask),
                "policy/dppo_divergence_mean": masked_metric_mean(div.float(), mask),
            },
        )


def apply_masks(
    masks: Sequence[TokenMask],
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    rollout_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    response_ids: Tensor | None = None,
) -> MaskOutput | None:
    """Run ``masks`` on one batch and :func:`combine` them (None without masks); advantages (N,) or (N, T)."""
    if not masks:
        return None
    mask = response_mask.bool()
    rollout = None if rollout_logprobs is None else masked_fill_padding(rollout_logprobs.detach(), mask)
    adv = masked_fill_padding(broadcast_advantages(advantages, logprobs), mask)
    inputs = MaskInputs(logprobs, old_logprobs, adv, mask, rollout, entropy, response_ids)
    return combine([m(inputs) for m in masks], mask)  # over components, not tokens


def combine(outputs: list[MaskOutput], mask: Tensor) -> MaskOutput | None:
    """The product of several masks' weights, the sums of their penalties, all their metrics."""
    if not outputs:
        return None
    weights = torch.ones_like(outputs[0].weights)
    kl_coef = penalty = None
    metrics: dict[str, Tensor] = {}
    for out in outputs:  # over components, not tokens
        weights = weights * out.weights.detach()
        kl_coef = add_optional(kl_coef, out.kl_coef)
        penalty = add_optional(penalty, out.penalty)
        metrics.update(out.metrics)
    weights = masked_fill_padding(weights, mask.bool())
    return MaskOutput(weights=weights, kl_coef=kl_coef, penalty=penalty, metrics=metrics)


def add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b
