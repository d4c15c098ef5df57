"""`PolicyObjective`: the composition ratio -> clip -> token masks -> aggregation (+ beta * KL).

``loss = agg(w * (clip(exp(ratio(lp, old, m)), A) + c |lp - old|)) + kl_coef * agg(kl(lp, ref))``, with ``w``
the product of the token masks' and the mismatch correction's weights and ``c`` the masks' penalty coefficients
(``docs/algorithms.md#how-the-pieces-meet``). Padding log-probs are replaced by 0 before any component sees
them, so -inf or NaN at padding never reaches the loss or its gradient.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

from torch import Tensor, nn

from gspo_lightning.components.aggregation import (
    AggregationMode,
    LossCounts,
    aggregate,
    check_mode,
    masked_metric_mean,
)
from gspo_lightning.components.clip import Clip
from gspo_lightning.components.kl import K1KL, KL
from gspo_lightning.components.masks import TokenMask, add_optional, apply_masks
from gspo_lightning.components.ratio import Ratio
from gspo_lightning.ops import masked_fill_padding, seq_lengths


@dataclass
class ObjectiveOutput:
    """Result of :class:`PolicyObjective`.

    Attributes:
        loss: scalar, differentiable: policy loss plus ``kl_coef`` times the KL term.
        metrics: detached float scalars named ``policy/<name>`` (means over this micro-batch's real tokens).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class PolicyObjective(nn.Module):
    """The policy loss of GSPO, GRPO, Dr. GRPO, DAPO... as a composition of components.

    Args:
        ratio: importance ratio component (``SequenceRatio`` for GSPO).
        clip: surrogate component (``PPOClip(3e-4, 4e-4)`` for GSPO).
        kl: KL estimator; required when ``kl_coef > 0``.
        kl_coef: beta, weight of the KL term in the loss. 0 means no KL term (and no reference model).
        aggregation: how per-token losses become a scalar (see ``aggregation``).
        max_len: ``T_max`` for ``seq-mean-token-sum-norm`` (the generation limit).
        masks: token masks of the ``update`` stage, computed here per micro-batch from the current policy
            (``components.masks``); ``pre_update`` masks reach :meth:`forward` as ``token_weights`` and
            ``token_kl_coef``.
    """

    def __init__(
        self,
        ratio: Ratio,
        clip: Clip,
        kl: KL | None = None,
        kl_coef: float = 0.0,
        aggregation: AggregationMode = "token-mean",
        max_len: int | None = None,
        masks: list[TokenMask] | None = None,
    ) -> None:
        super().__init__()
        check_mode(aggregation)
        masks = list(masks or [])
        misplaced = [type(m).__name__ for m in masks if m.stage != "update"]  # over components, not tokens
        if misplaced:
            raise ValueError(
                f"{', '.join(misplaced)} run before the update (stage pre_update): pass them to the module."
            )
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}.")
        if kl_coef > 0 and kl is None:
            raise ValueError(f"kl_coef={kl_coef} needs a KL estimator: pass kl=K3KL() (or K1KL, K2KL).")
        if kl_coef > 0 and isinstance(kl, K1KL):
            warnings.warn(
                "K1KL as a loss term (kl_coef > 0) has zero expected gradient: it does not pull the policy towards"
                " the reference. Use K3KL or K2KL in the loss, or K1KL with kl_in_reward.",
                stacklevel=2,
            )
        self.ratio = ratio
        self.clip = clip
        self.kl = kl
        self.kl_coef = kl_coef
        self.aggregation = aggregation
        self.max_len = max_len
        self.masks = nn.ModuleList(masks)
        # a user's clip written before clips took the mask (forward(log_ratio, advantages)) keeps working
        self._clip_takes_mask = "response_mask" in inspect.signature(clip.forward).parameters

    @property
    def uses_kl(self) -> bool:
        return self.kl is not None and self.kl_coef > 0

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        ref_logprobs: Tensor | None = None,
        counts: LossCounts | None = None,
        token_weights: Tensor | None = None,
        rollout_logprobs: Tensor | None = None,
        token_kl_coef: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Compute the loss of one (micro-)batch.

        Args:
            logprobs: (N, T) log pi_theta of the sampled tokens, with gradient.
            old_logprobs: (N, T) log pi_old.
            advantages: (N,) or (N, T).
            response_mask: (N, T) bool.
            ref_logprobs: (N, T) log pi_ref; needed when ``kl_coef > 0``.
            counts: global denominators when this is one part of a larger batch (see ``aggregate``).
            token_weights: (N, T) detached weights multiplying each token's policy loss before aggregation
                (rollout/trainer mismatch importance sampling, ``components.mismatch``, and the pre-update token
                masks).
            rollout_logprobs: (N, T) the engine's log-probs, for update-stage masks that read the behaviour policy.
            token_kl_coef: (N, T) detached coefficients ``c`` of a ``c |lp - old|`` penalty (KL-Cov), or None.
        """
        mask = response_mask.bool()
        lp = masked_fill_padding(logprobs, mask)
        old = masked_fill_padding(old_logprobs.detach(), mask)
        if advantages.dim() == 2:
            advantages = masked_fill_padding(advantages, mask)
        log_ratio = self.ratio(lp, old, mask)
        out = self.clip(log_ratio, advantages, mask) if self._clip_takes_mask else self.clip(log_ratio, advantages)
        per_token, metrics = out.loss, self._clip_metrics(out.ratio, out.clipped_low, out.clipped_high, mask)
        masked = apply_masks(list(self.masks), lp, old, advantages, mask, rollout_logprobs)
        if masked is not None:
            metrics.update(masked.metrics)
            token_weights = masked.weights if token_weights is None else token_weights.detach() * masked.weights
            token_kl_coef = add_optional(token_kl_coef, masked.kl_coef)
        if token_kl_coef is not None:
            penalty = token_kl_coef.detach() * (lp - old).abs()
            per_token = per_token + masked_fill_padding(penalty, mask)
            metrics["policy/token_kl_penalty"] = masked_metric_mean(penalty, mask)
        if token_weights is not None:
            per_token = per_token * token_weights.detach()
            metrics["policy/masked_frac"] = masked_metric_mean((token_weights.detach() == 0).float(), mask)
        if masked is not None and masked.penalty is not None:
            per_token = per_token + masked_fill_padding(masked.penalty, mask)
        pg_loss = aggregate(per_token, mask, self.aggregation, counts, self.max_len)
        loss = pg_loss
        metrics["policy/pg_loss"] = pg_loss.detach().float()
        if ref_logprobs is not None and self.kl is not None:
            ref = masked_fill_padding(ref_logprobs.detach(), mask)
            kl = self.kl(lp, ref)
            kl_loss = aggregate(kl, mask, self.aggregation, counts, self.max_len)
            metrics["policy/kl"] = masked_metric_mean(kl, mask)
            if self.kl_coef > 0:
                loss = loss + self.kl_coef * kl_loss
        elif self.uses_kl:
            raise ValueError("kl_coef > 0 but no ref_logprobs were given: the reference model's log-probs are needed.")
        return ObjectiveOutput(loss=loss, metrics=metrics)

    @staticmethod
    def _clip_metrics(ratio: Tensor, low: Tensor, high: Tensor, mask: Tensor) -> dict[str, Tensor]:
        ratio = ratio.detach().float()
        clipped = (low | high) & mask
        nonempty = seq_lengths(mask) > 0
        real = ratio[mask]
        empty = ratio.new_zeros(())
        return {
            "policy/ratio_mean": masked_metric_mean(ratio, mask),
            "policy/ratio_min": real.min() if real.numel() else empty,
            "policy/ratio_max": real.max() if real.numel() else empty,
            "policy/clip_frac_token": masked_metric_mean(clipped.float(), mask),
            "policy/clip_frac_low": masked_metric_mean((low & mask).float(), mask),
            "policy/clip_frac_high": masked_metric_mean((high & mask).float(), mask),
            # A sequence counts as clipped when any of its tokens is; for GSPO's sequence ratio all its
            # tokens share one ratio, so this is exactly the fraction of clipped sequences.
            "policy/clip_frac_seq": (clipped.any(-1) & nonempty).float().sum() / nonempty.sum().clamp(min=1),
        }
