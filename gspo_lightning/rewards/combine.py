"""Reward combination: several rewards summed with one weight each, ``sum_k w_k r_k``.

:func:`compute_rewards` scores a list of rewards and returns the weighted total with each reward's unweighted
scores under a unique name (for ``rollout/reward_<name>`` logs); :func:`check_weights` is the one check of the
weights (one finite number per reward), used for ``data.reward_weights`` and :class:`WeightedReward` alike;
:class:`WeightedReward` is the same sum as a single :class:`~gspo_lightning.rewards.base.Reward`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``_1``, ``_2``, ... (the first keeps its name)."""
    out: list[str] = []
    for name in names:
        unique, k = name, 0
        while unique in out:
            k += 1
            unique = f"{name}_{k}"
        out.append(unique)
    return out


def check_weights(n_rewards: int, weights: Sequence[float] | None, option: str = "data.reward_weights") -> list[float]:
    """``weights`` validated against ``n_rewards`` (all 1.0 when None).

    Args:
        n_rewards: how many rewards the weights are for.
        weights: one weight per reward, or None for 1 each.
        option: the setting the weights come from, named in the error messages.

    Raises:
        ValueError: no rewards, or weights of the wrong length or not finite.
    """
    if n_rewards == 0:
        raise ValueError("No rewards given: configure at least one reward (e.g. MathAnswerReward).")
    if weights is None:
        return [1.0] * n_rewards
    weights = [float(w) for w in weights]
    if len(weights) != n_rewards:
        raise ValueError(
            f"{option} has {len(weights)} weights for {n_rewards} rewards; give one each (or null to weigh each by 1)."
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{option} must be finite numbers, got {weights}.")
    return weights


def compute_rewards(
    rewards: Sequence[Reward], weights: Sequence[float] | None, inputs: RewardInputs
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of ``rewards`` and each reward's unweighted scores.

    Args:
        rewards: the rewards to evaluate, each called once on ``inputs``.
        weights: one weight per reward (``data.reward_weights``); None weighs each by 1.
        inputs: the samples to score.

    Returns:
        ``(total, terms)``: total (N,) float32 ``sum_k w_k r_k``; terms maps each reward's name to its
        (N,) unweighted scores (repeated names get ``_1``, ``_2``, ...), for ``rollout/reward_<name>`` logs.

    Raises:
        ValueError: no rewards, or weights of the wrong length or not finite.
        RewardError: a reward failed or returned invalid scores.
    """
    rewards = list(rewards)
    ws = check_weights(len(rewards), weights)
    names = unique_names([r.name for r in rewards])
    total = torch.zeros(len(inputs), dtype=torch.float32, device=inputs.response_lengths.device)
    terms: dict[str, Tensor] = {}
    for name, reward, w in zip(names, rewards, ws, strict=True):
        terms[name] = reward(inputs)
        total = total + w * terms[name]
    return total, terms


@REWARDS.register
class WeightedReward(Reward):
    """A weighted sum of rewards, sum_k w_k r_k, as a single reward object.

    :func:`compute_rewards` does the same for a list of rewards and also returns each term for logging;
    this wrapper is for places that take one reward. E.g. DAPO (arXiv 2503.14476) pairs a correctness
    reward with :class:`OverlongPenalty`.

    Args:
        rewards: the rewards to combine (at least one).
        weights: one weight per reward; None weighs each by 1.
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call, which then runs on a worker thread; None for none (see
            :class:`~gspo_lightning.rewards.base.Reward`); it bounds the whole sum, while each reward keeps its
            own.

    Raises:
        ValueError: no rewards, or weights of the wrong length or not finite.
    """

    def __init__(
        self,
        rewards: list[Reward],
        weights: list[float] | None = None,
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name, timeout_s)
        self.rewards = list(rewards)
        self.weights = check_weights(len(self.rewards), weights, option="WeightedReward weights")

    def score(self, inputs: RewardInputs) -> Tensor:
        return self.terms(inputs)[0]

    def terms(self, inputs: RewardInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum and each reward's unweighted scores, as :func:`compute_rewards`."""
        return compute_rewards(self.rewards, self.weights, inputs)
