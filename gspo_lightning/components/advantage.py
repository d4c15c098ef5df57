"""Advantage estimators: one value per sequence (N,) or per token (N, T), computed once per rollout batch.

Every advantage runs without gradient (the base class enforces it, for user subclasses too). Groups are
the G samples of one prompt, found through ``batch.group_ids``; all group statistics are vectorised
scatter reductions (``gspo_lightning.ops``), and a group whose rewards are all equal gets advantage 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.ops import global_std, group_index, group_stats, group_sum, seq_mean
from gspo_lightning.registry import Registry


class Advantage(nn.Module, ABC):
    """Base class: ``forward(batch) -> (N,) or (N, T)`` advantages, never with gradient.

    Read the rewards from ``batch.advantage_rewards``: the scored rewards, less the KL penalty when the KL
    term is applied in the reward. Set the class attribute ``needs_ref = True`` when the estimator reads
    ``batch.ref_logprobs``; the training module then runs the reference model even with a zero KL
    coefficient.
    """

    needs_ref: ClassVar[bool] = False

    @abstractmethod
    def forward(self, batch: RolloutBatch) -> Tensor: ...

    def __call__(self, batch: RolloutBatch) -> Tensor:
        with torch.no_grad():
            return super().__call__(batch).detach().to(torch.float32)


ADVANTAGES: Registry[Advantage] = Registry("advantage", Advantage)


@ADVANTAGES.register
class GroupNormAdvantage(Advantage):
    """Group-normalised advantage of GRPO/GSPO: A_i = (R_i - mean_g R) / (std R + eps).

    GSPO paper (arXiv 2507.18071) eq. 6, same as GRPO (arXiv 2402.03300). The std is the unbiased
    (Bessel-corrected, G-1) standard deviation, as ``torch.std`` and TRL use.

    Args:
        scale: which std divides: ``"group"`` (of the prompt's G rewards), ``"batch"`` (of all N rewards of
            every data-parallel rank, as TRL's ``scale_rewards="batch"``; less sensitive to groups with tiny
            spread; a collective under data parallelism) or ``"none"`` (no division, Dr. GRPO).
        eps: added to the std; a group whose rewards are all equal gets exactly 0 whatever eps is.
    """

    def __init__(self, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-6) -> None:
        super().__init__()
        if scale not in ("group", "batch", "none"):
            raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}.")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.scale = scale
        self.eps = eps

    def forward(self, batch: RolloutBatch) -> Tensor:
        rewards = batch.advantage_rewards.to(torch.float64)
        mean, std, _ = group_stats(rewards, batch.group_ids)
        centred = rewards - mean
        if self.scale == "none":
            return centred
        if self.scale == "batch":
            std = global_std(rewards).expand_as(rewards)  # over every rank, as TRL and verl
        # A zero spread means every centred reward is 0: return 0 rather than 0/0 when eps is 0.
        return torch.where(std > 0, centred / (std + self.eps), torch.zeros_like(centred))


@ADVANTAGES.register
class GroupMeanAdvantage(GroupNormAdvantage):
    """Dr. GRPO advantage (arXiv 2503.20783, eq. 3): A_i = R_i - mean_g R, no std division.

    The YAML spelling of ``GroupNormAdvantage(scale="none")``, kept because Dr. GRPO configs name it.
    """

    def __init__(self) -> None:
        super().__init__(scale="none")


@ADVANTAGES.register
class RLOOAdvantage(Advantage):
    """Leave-one-out baseline (RLOO, arXiv 2402.14740): A_i = R_i - mean_{j!=i} R_j = G/(G-1)(R_i - mean_g R).

    A group of one sample has no baseline and gets advantage 0.
    """

    def forward(self, batch: RolloutBatch) -> Tensor:
        rewards = batch.advantage_rewards.to(torch.float64)
        mean, _, count = group_stats(rewards, batch.group_ids)
        factor = torch.where(count > 1, count / (count - 1).clamp(min=1.0), torch.zeros_like(count))
        return factor * (rewards - mean)


@ADVANTAGES.register
class ContrastAdvantage(Advantage):
    """A "good vs bad" contrast advantage some write-ups propose (in no paper): +-(mean s_good - mean s_bad).

    Within each group, sequences with ``R_i >= mean_g R`` are "good", the rest "bad";
    ``s_i = exp((1/L_i) sum_t (old_it - ref_it))`` is each sequence's length-normalised ratio of the
    sampling policy against the reference model (pi_theta / pi_ref, with theta = theta_old when advantages
    are computed); ``A = mean_good s - mean_bad s``; good sequences get ``+A`` and bad ones ``-A``
    (``docs/algorithms.md#advantages``).

    Properties (tested): the advantage does not depend on reward magnitudes beyond the split; it is
    not zero-mean within a group (sum = (n_good - n_bad) A); it is 0 when the policy equals the reference
    (all s = 1), so it needs a reference model that has drifted, hence ``needs_ref``; its sign follows the
    policy, not the reward: if pi_old already prefers bad sequences (A < 0), good ones are pushed down.

    Where a group has no bad (or no good) sequence, i.e. all rewards are equal, taking the empty mean as 0
    would give every member ``A = mean s ~ 1``, a push with no reward signal; here such a group gets 0, like
    every other advantage. Rewards within ``tol`` of the
    group mean count as good, so float rounding cannot split an all-equal group.

    Args:
        tol: tolerance of the ``R_i >= mean`` test.
    """

    needs_ref: ClassVar[bool] = True

    def __init__(self, tol: float = 1e-6) -> None:
        super().__init__()
        self.tol = tol

    def forward(self, batch: RolloutBatch) -> Tensor:
        if batch.ref_logprobs is None or batch.old_logprobs is None:
            raise ValueError(
                "ContrastAdvantage needs batch.old_logprobs and batch.ref_logprobs (s_i is pi_old / pi_ref);"
                " the training module provides both when a reference model is configured."
            )
        rewards = batch.advantage_rewards.to(torch.float64)
        mean, _, _ = group_stats(rewards, batch.group_ids)
        good = rewards >= mean - self.tol * mean.abs().clamp(min=1.0)
        s = torch.exp(seq_mean(batch.old_logprobs.float() - batch.ref_logprobs.float(), batch.response_mask.bool()))
        index, k = group_index(batch.group_ids)
        n_good = group_sum(good.float(), index, k)
        n_bad = group_sum((~good).float(), index, k)
        s_good = group_sum(torch.where(good, s, 0.0), index, k) / n_good.clamp(min=1.0)
        s_bad = group_sum(torch.where(good, 0.0, s), index, k) / n_bad.clamp(min=1.0)
        contrast = torch.where((n_good > 0) & (n_bad > 0), s_good - s_bad, 0.0)[index]
        return torch.where(good, contrast, -contrast)
