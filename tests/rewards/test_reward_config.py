"""Rewards built by jsonargparse from config: short names, user classes and functions by import path."""

import textwrap

import pytest
import torch
from jsonargparse import ArgumentParser
from reward_inputs import make_inputs

from gspo_lightning.rewards import (
    REWARDS,
    ExactMatchReward,
    FunctionReward,
    OverlongPenalty,
    RegexFormatReward,
    Reward,
    WeightedReward,
)

USER_MODULE = '''
from gspo_lightning.rewards import Reward


def length_bonus(prompts, completions, answers, response_lengths):
    return (response_lengths.float() / 10).tolist()


class MyReward(Reward):
    """A user's reward, never registered."""

    def __init__(self, bonus: float = 2.0) -> None:
        super().__init__()
        self.bonus = bonus

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        return self.bonus if answer is not None and answer in completion else 0.0
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_gspo_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_gspo_rewards"


def build(config: dict) -> Reward:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    return parser.instantiate(parser.parse_object({"reward": config})).reward


def test_function_reward_from_dotted_path(user_module):
    reward = build({"class_path": "FunctionReward", "init_args": {"fn": f"{user_module}.length_bonus"}})
    assert isinstance(reward, FunctionReward) and reward.name == "length_bonus"
    out = reward(make_inputs(["a", "b"], lengths=[5, 20]))
    torch.testing.assert_close(out, torch.tensor([0.5, 2.0]))


def test_user_subclass_by_import_path_without_registration(user_module):
    reward = build({"class_path": f"{user_module}.MyReward", "init_args": {"bonus": 3}})
    assert type(reward).__name__ == "MyReward" and "MyReward" not in REWARDS
    assert reward.bonus == 3.0  # jsonargparse applied the float annotation
    torch.testing.assert_close(reward(make_inputs(["x 57", "x"])), torch.tensor([3.0, 0.0]))


def test_short_names_and_typed_init_args():
    reward = build({"class_path": "ExactMatchReward", "init_args": {"case_sensitive": False}})
    assert isinstance(reward, ExactMatchReward) and reward.case_sensitive is False
    reward = build({"class_path": "RegexFormatReward", "init_args": {"pattern": "^57$", "mode": "fullmatch"}})
    assert isinstance(reward, RegexFormatReward) and reward.mode == "fullmatch"
    reward = build({"class_path": "OverlongPenalty", "init_args": {"buffer": 8, "max_new_tokens": None}})
    assert isinstance(reward, OverlongPenalty) and reward.buffer == 8


def test_literal_mode_is_checked_by_the_parser():
    with pytest.raises(Exception, match="search"):
        build({"class_path": "RegexFormatReward", "init_args": {"pattern": "a", "mode": "match"}})


def test_weighted_reward_with_nested_rewards(user_module):
    reward = build(
        {
            "class_path": "WeightedReward",
            "init_args": {
                "rewards": [
                    {"class_path": "ExactMatchReward"},
                    {"class_path": f"{user_module}.MyReward", "init_args": {"bonus": 1.0}},
                ],
                "weights": [1.0, 0.5],
            },
        }
    )
    assert isinstance(reward, WeightedReward) and reward.weights == [1.0, 0.5]
    # "57": exact 1 + 0.5 * 1; "x 57": exact 0 + 0.5 * 1; "x": 0
    torch.testing.assert_close(reward(make_inputs(["57", "x 57", "x"])), torch.tensor([1.5, 0.5, 0.0]))


@pytest.mark.parametrize("entry", REWARDS.describe(), ids=lambda e: e.name)
def test_every_registered_reward_builds_from_config(entry, user_module):
    required = {
        "FunctionReward": {"fn": f"{user_module}.length_bonus"},
        "RegexFormatReward": {"pattern": "57"},
        "WeightedReward": {"rewards": [{"class_path": "ExactMatchReward"}]},
    }
    reward = build({"class_path": entry.name, "init_args": required.get(entry.name, {})})
    assert type(reward) is entry.cls
    inputs = make_inputs(["57", "no"])
    inputs.trajectory_rewards = torch.tensor([1.0, 0.0])  # what multi-turn rollouts add (TrajectoryReward)
    out = reward(inputs)
    assert out.shape == (2,) and torch.isfinite(out).all()
