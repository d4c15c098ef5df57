"""Several rewards as one: a weighted sum that is itself a :class:`Reward`."""

from __future__ import annotations

from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs, check_weights, compute_rewards


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
        self.weights = check_weights(len(self.rewards), weights)

    def score(self, inputs: RewardInputs) -> Tensor:
        return self.terms(inputs)[0]

    def terms(self, inputs: RewardInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted sum and each reward's unweighted scores, as :func:`compute_rewards`."""
        return compute_rewards(self.rewards, self.weights, inputs)
