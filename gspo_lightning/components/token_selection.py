"""Token masks that select tokens across the rollout batch: forking tokens, Clip-Cov, KL-Cov.

Each ranks or centres the rollout batch's real tokens (this rank's), so each runs at the ``pre_update`` stage
(``components.masks``): from pi_old's log-probs and entropies, once, before any update. The selection is then
one fixed set of tokens for all the batch's optimizer steps and any micro-batch split. At the first mini-batch
of an exactly on-policy batch pi_old is the current policy, so the statistics are the papers'; later
mini-batches keep the first selection instead of re-ranking with the moved policy
(``docs/algorithms.md#token-masks``).

The covariance of a token (arXiv 2505.22617) centres over the batch's real tokens:
``Cov_it = (log pi(y_it) - mean(log pi)) * (A_it - mean(A))``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from gspo_lightning.components.aggregation import masked_metric_mean
from gspo_lightning.components.masks import MASKS, MaskInputs, MaskOutput, MaskStage, TokenMask, dropped_frac
from gspo_lightning.rng import derive_seed


def _check_fraction(name: str, value: float, owner: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{owner} needs 0 < {name} <= 1, got {value}.")


def token_covariance(inputs: MaskInputs) -> Tensor:
    """(N, T) ``(lp_it - mean lp) (A_it - mean A)``, means over the real tokens; 0 at padding."""
    mask = inputs.response_mask.bool()
    lp, adv = inputs.logprobs.detach().double(), inputs.advantages.detach().double()
    count = mask.sum().clamp(min=1)
    lp_c = lp - lp[mask].sum() / count
    adv_c = adv - adv[mask].sum() / count
    return (lp_c * adv_c).masked_fill(~mask, 0.0)


def top_k_real(score: Tensor, mask: Tensor, k: int) -> Tensor:
    """(N, T) bool: the ``k`` real tokens with the largest ``score`` (ties broken by position)."""
    flat = score.masked_fill(~mask, float("-inf")).flatten()
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[torch.topk(flat, k).indices] = True
    return chosen.view_as(mask) & mask


def linear_quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-D tensor of any size: torch.quantile refuses
    inputs over 16M elements, which a rollout batch of 1024 x 16k tokens is."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@MASKS.register
class HighEntropyTokens(TokenMask):
    """Forking tokens (arXiv 2506.01939): only the top ``top_fraction`` of tokens by entropy carry gradient.

    ``M_it = 1[H_it >= q]``, ``q`` the ``(1 - top_fraction)`` quantile of the entropies of the rollout batch's
    real tokens under pi_old (the paper keeps the top 20%); as TRL's ``top_entropy_quantile``, ties at ``q``
    are kept.

    Args:
        top_fraction: the share of tokens kept (0.2 in the paper).
    """

    stage: ClassVar[MaskStage] = "pre_update"
    needs_entropy: ClassVar[bool] = True

    def __init__(self, top_fraction: float = 0.2) -> None:
        super().__init__()
        _check_fraction("top_fraction", top_fraction, "HighEntropyTokens")
        self.top_fraction = top_fraction

    def forward(self, inputs: MaskInputs) -> MaskOutput:
        if inputs.entropy is None:
            raise ValueError("HighEntropyTokens needs the per-token entropy (MaskInputs.entropy).")
        mask = inputs.response_mask.bool()
        real = inputs.entropy[mask].float()
        if not real.numel():
            return MaskOutput(weights=mask.float())
        threshold = linear_quantile(real, 1.0 - self.top_fraction)
        keep = (inputs.entropy >= threshold) & mask
        return MaskOutput(
            weights=keep.float(),
            metrics={
                "policy/forking_kept_frac": masked_metric_mean(keep.float(), mask),
                "policy/forking_entropy_threshold": threshold.detach().float(),
            },
        )


@MASKS.register
class ClipCov(TokenMask):
    """Clip-Cov (arXiv 2505.22617): detach a random ``ratio`` share of tokens of high covariance.

    Of the real tokens with ``low < Cov_it < high``, ``max(1, floor(ratio * n))`` are drawn uniformly (n the
    real tokens of the batch) and their policy loss carries no gradient (weight 0). The draw is seeded by
    ``seed`` and the batch's token ids, so a resumed run draws the same tokens.

    Args:
        ratio: the share of the batch's tokens detached (2e-4 in the paper).
        low: the lower covariance bound (1 in the paper).
        high: the upper covariance bound (5 in the paper).
        seed: the base seed of the draw.
    """

    stage: ClassVar[MaskStage] = "pre_update"

    def __init__(self, ratio: float = 2e-4, low: float = 1.0, high: float = 5.0, seed: int = 0) -> None:
        super().__init__()
        _check_fraction("ratio", ratio, "ClipCov")
        if not low < high:
            raise ValueError(f"ClipCov needs low < high, got low={low}, high={high}.")
        self.ratio, self.low, self.high, self.seed = ratio, low, high, seed

    def forward(self, inputs: MaskInputs) -> MaskOutput:
        mask = inputs.response_mask.bool()
        cov = token_covariance(inputs)
        band = (cov > self.low) & (cov < self.high) & mask
        k = min(max(1, int(self.ratio * int(mask.sum()))), int(band.sum()))
        score = torch.rand(mask.shape, generator=self._generator(inputs), dtype=torch.float64).to(cov.device)
        chosen = top_k_real(score, band, k) if k > 0 else torch.zeros_like(mask)
        keep = mask & ~chosen
        return MaskOutput(weights=keep.float(), metrics={"policy/clip_cov_frac": dropped_frac(keep, mask)})

    def _generator(self, inputs: MaskInputs) -> torch.Generator:
        ids = inputs.response_ids
        digest = 0 if ids is None else int((ids.long().cpu().flatten() % 1_000_003).sum())
        return torch.Generator().manual_seed(derive_seed(self.seed, digest, *inputs.response_mask.shape))


@MASKS.register
class KLCov(TokenMask):
    """KL-Cov (arXiv 2505.22617): a KL penalty ``coef |lp - old|`` on the tokens of largest covariance.

    The ``max(1, floor(ratio * n))`` real tokens with the largest ``Cov_it`` get ``coef * |lp_it - old_it|``
    added to their loss (verl's absolute-difference estimate of the KL to pi_old); every token keeps its
    policy gradient. The paper pairs it with no clipping (``clip: NoClip``, as ``configs/algorithms/kl_cov.yaml``).

    Args:
        ratio: the share of the batch's tokens penalised (2e-3 for the paper's 7B model, 2e-4 for 32B).
        coef: the penalty's weight beta (1 in the paper).
    """

    stage: ClassVar[MaskStage] = "pre_update"

    def __init__(self, ratio: float = 2e-3, coef: float = 1.0) -> None:
        super().__init__()
        _check_fraction("ratio", ratio, "KLCov")
        if coef <= 0:
            raise ValueError(f"KLCov needs coef > 0, got {coef}.")
        self.ratio, self.coef = ratio, coef

    def forward(self, inputs: MaskInputs) -> MaskOutput:
        mask = inputs.response_mask.bool()
        n = int(mask.sum())
        if n == 0:
            return MaskOutput(weights=mask.float())
        chosen = top_k_real(token_covariance(inputs), mask, min(max(1, int(self.ratio * n)), n))
        return MaskOutput(
            weights=mask.float(),
            kl_coef=chosen.float() * self.coef,
            metrics={"policy/kl_cov_frac": masked_metric_mean(chosen.float(), mask)},
        )
