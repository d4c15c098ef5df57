"""The reward an environment (or a rollout function) gave each multi-turn trajectory, as a reward component."""

from __future__ import annotations

from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs


@REWARDS.register
class TrajectoryReward(Reward):
    """The environment's return of each trajectory: the sum of its ``Step.reward``s (or ``Trajectory.reward``).

    Combine it with answer rewards in ``data.rewards`` like any other reward.

    Raises:
        RewardError: when called on single-turn rollouts, which have no environment (configure
            ``data.environment``, ``data.tools`` or ``data.rollout_function``).
    """

    def score(self, inputs: RewardInputs) -> Tensor:
        if inputs.trajectory_rewards is None:
            raise ValueError(
                "TrajectoryReward scores multi-turn trajectories, but these rollouts are single-turn: set"
                " data.environment, data.tools or data.rollout_function, or remove TrajectoryReward."
            )
        return inputs.trajectory_rewards
