"""AdditionTask: determinism, disjoint splits, correct answers, sizes, errors, SFT examples."""

from __future__ import annotations

import time

import pytest

from gspo_lightning.data import PROMPT_SOURCES, AdditionTask, PromptRecord, PromptSource


def _pairs(records: list[PromptRecord]) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in r.text[:-1].split("+")) for r in records]


def test_same_seed_same_splits_and_different_seed_differs():
    a = AdditionTask(num_digits=2, num_train=300, num_val=50, seed=3)
    b = AdditionTask(num_digits=2, num_train=300, num_val=50, seed=3)
    c = AdditionTask(num_digits=2, num_train=300, num_val=50, seed=4)
    assert a.train() == b.train() and a.validation() == b.validation()
    assert a.train() != c.train()
    assert a.validation() != c.validation()


def test_validation_split_does_not_depend_on_num_train():
    small = AdditionTask(num_digits=3, num_train=10, num_val=40, seed=1)
    large = AdditionTask(num_digits=3, num_train=5000, num_val=40, seed=1)
    assert small.validation() == large.validation()


def test_splits_are_disjoint_distinct_and_sized():
    task = AdditionTask(num_digits=2, num_train=2000, num_val=300, seed=0)
    train, val = _pairs(task.train()), _pairs(task.validation())
    assert len(train) == 2000 and len(val) == 300
    assert len(set(train)) == len(train) and len(set(val)) == len(val)
    assert not set(train) & set(val)
    assert [r.index for r in task.train()] == list(range(2000))
    assert [r.index for r in task.validation()] == list(range(300))


def test_prompt_format_answers_and_operand_range():
    task = AdditionTask(num_digits=2, num_train=500, num_val=100, seed=7)
    for record in task.train() + task.validation():
        a, b = (int(x) for x in record.text[:-1].split("+"))
        assert record.text == f"{a}+{b}="
        assert record.answer == str(a + b)
        assert 0 <= a <= 99 and 0 <= b <= 99
    operands = [x for pair in _pairs(task.train()) for x in pair]
    assert max(operands) >= 90 and min(operands) <= 9  # spread over the whole range


def test_whole_pair_space_can_be_used():
    task = AdditionTask(num_digits=1, num_train=90, num_val=10, seed=0)
    pairs = _pairs(task.train()) + _pairs(task.validation())
    assert sorted(pairs) == [(a, b) for a in range(10) for b in range(10)]


def test_too_many_pairs_raises():
    with pytest.raises(ValueError, match=r"only 100 distinct \(a, b\) pairs.*num_train"):
        AdditionTask(num_digits=1, num_train=95, num_val=10)


@pytest.mark.parametrize("kwargs", [{"num_digits": 0}, {"num_train": 0}, {"num_val": -1}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        AdditionTask(**kwargs)


def test_defaults_work_and_generation_is_fast():
    start = time.perf_counter()
    task = AdditionTask(num_digits=3, num_train=20000, num_val=500)
    assert len(task.train()) == 20000
    assert time.perf_counter() - start < 1.0
    default = AdditionTask()
    assert len(default.train()) == 9500 and len(default.validation()) == 500


def test_sft_examples_come_from_train_only():
    task = AdditionTask(num_digits=2, num_train=400, num_val=200, seed=2)
    train = {(r.text, r.answer) for r in task.train()}
    examples = task.sft_examples(300, seed=5)
    assert len(examples) == 300 and len(set(examples)) == 300
    assert set(examples) <= train
    assert task.sft_examples(300, seed=5) == examples
    assert task.sft_examples(300, seed=6) != examples
    many = task.sft_examples(1000, seed=0)  # more than the train split: drawn with replacement
    assert len(many) == 1000 and set(many) <= train


def test_registered_as_prompt_source():
    assert PROMPT_SOURCES.get("AdditionTask") is AdditionTask
    assert isinstance(AdditionTask(num_train=10, num_val=0), PromptSource)
    assert AdditionTask(num_train=10, num_val=0).validation() == []
