"""A reward function's arguments checked against the prompt columns at set-up, not at the first rollout (issue 22,
item 21)."""

from __future__ import annotations

import functools
import json

import pytest

from gspo_lightning.data import AdditionTask, FilePrompts
from gspo_lightning.rewards import ExactMatchReward, FunctionReward, WeightedReward
from gspo_lightning.rewards.base import check_reward_columns
from gspo_lightning.rollout import RolloutDataModule, RolloutOptions


def needs_cases(prompts, completions, answers, test_cases):
    return [0.0] * len(completions)


def needs_cases_and_more(prompts, completions, answers, test_cases, **kwargs):
    return [0.0] * len(completions)


def optional_cases(prompts, completions, answers, test_cases=None, *, response_lengths):
    return [0.0] * len(completions)


def takes_everything(*args, **kwargs):
    return [0.0] * len(args[1])


def too_few_lists(completions, **kwargs):
    return [0.0] * len(completions)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("fn", [needs_cases, needs_cases_and_more, functools.partial(needs_cases_and_more)])
def test_an_argument_naming_a_missing_column_is_refused(fn):
    with pytest.raises(ValueError) as err:
        check_reward_columns([FunctionReward(fn, name="cases")], [{"level": 1}], "the training prompts")
    msg = _one_line(err)
    assert "FunctionReward 'cases'" in msg and "argument 'test_cases'" in msg and "the training prompts" in msg, msg
    assert "['level']" in msg and "default" in msg, msg  # the columns there are, and the fixes


def test_columns_the_function_can_take_pass():
    columns = [{"test_cases": [1], "level": 1}]
    for fn in (needs_cases, needs_cases_and_more, optional_cases, takes_everything, lambda p, c, a: [0.0] * len(c)):
        check_reward_columns([FunctionReward(fn)], columns, "the training prompts")
    check_reward_columns([FunctionReward(optional_cases)], [{}], "the training prompts")  # default, built-in kwarg
    check_reward_columns([FunctionReward(takes_everything), ExactMatchReward()], [{}], "the training prompts")


def test_members_of_a_weighted_reward_are_checked():
    weighted = WeightedReward([ExactMatchReward(), FunctionReward(needs_cases)], [1.0, 0.5])
    with pytest.raises(ValueError, match=r"FunctionReward 'needs_cases' .*argument 'test_cases'.*\[\]"):
        check_reward_columns([weighted], [{}], "the training prompts")


def test_a_function_that_cannot_take_the_three_lists_is_refused():
    with pytest.raises(ValueError) as err:
        check_reward_columns([FunctionReward(too_few_lists)], [{}], "the training prompts")
    msg = _one_line(err)
    assert "'too_few_lists'" in msg and "(prompts, completions, answers" in msg and "(completions, **kwargs)" in msg


def _file(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_setup_refuses_a_reward_argument_no_column_provides(tmp_path, tiny_path):
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "level": i % 2} for i in range(4)]
    source = FilePrompts(_file(tmp_path, "train.jsonl", rows), cache_dir=str(tmp_path / "scratch"))
    options = RolloutOptions(prompts_per_step=2, num_samples=2)
    dm = RolloutDataModule(prompts=source, rewards=[FunctionReward(needs_cases)], tokenizer=tiny_path, rollout=options)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")  # before any rollout
    msg = _one_line(err)
    assert "'needs_cases'" in msg and "'test_cases'" in msg and "['level']" in msg and "training prompts" in msg, msg

    no_columns = RolloutDataModule(
        prompts=AdditionTask(num_train=8, num_val=2),
        rewards=[FunctionReward(needs_cases)],
        tokenizer=tiny_path,
        rollout=options,
    )
    with pytest.raises(ValueError, match=r"'test_cases'.*\[\]"):
        no_columns.setup("fit")


def test_setup_checks_the_accuracy_reward_against_the_held_out_prompts(tmp_path, tiny_path):
    train = [{"prompt": f"{i}+1=", "answer": str(i + 1), "test_cases": [i]} for i in range(4)]
    val = [{"prompt": "9+1=", "answer": "10"}]
    source = FilePrompts(
        _file(tmp_path, "train.jsonl", train), val_path=_file(tmp_path, "val.jsonl", val), cache_dir=str(tmp_path)
    )
    dm = RolloutDataModule(
        prompts=source,
        rewards=[FunctionReward(needs_cases)],  # the training prompts have test_cases
        accuracy_reward=FunctionReward(needs_cases, name="held_out_cases"),
        tokenizer=tiny_path,
        rollout=RolloutOptions(prompts_per_step=2, num_samples=2),
    )
    with pytest.raises(ValueError, match=r"'held_out_cases'.*'test_cases'.*held-out prompts"):
        dm.setup("fit")
