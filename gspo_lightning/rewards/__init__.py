"""Rewards: score decoded completions for RL fine-tuning.

Built-ins are registered in :data:`REWARDS` by class name; a reward of your own needs no registration,
configure it by import path (``class_path: my_pkg.rewards.MyReward``) or wrap a plain function in
:class:`FunctionReward`.
"""

from gspo_lightning.rewards.answer import ExactMatchReward, MathAnswerReward
from gspo_lightning.rewards.base import REWARDS, Reward, RewardError, RewardInputs
from gspo_lightning.rewards.combine import WeightedReward, compute_rewards
from gspo_lightning.rewards.format import RegexFormatReward
from gspo_lightning.rewards.function import FunctionReward
from gspo_lightning.rewards.overlong import OverlongPenalty
from gspo_lightning.rewards.trajectory import TrajectoryReward

__all__ = [
    "REWARDS",
    "ExactMatchReward",
    "FunctionReward",
    "MathAnswerReward",
    "OverlongPenalty",
    "RegexFormatReward",
    "Reward",
    "RewardError",
    "RewardInputs",
    "TrajectoryReward",
    "WeightedReward",
    "compute_rewards",
]
