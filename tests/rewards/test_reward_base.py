"""The Reward interface: per-sample loop, validation, error messages, and the weighted combination."""

import re

import pytest
import torch
from reward_inputs import make_inputs

from gspo_lightning.rewards import (
    ExactMatchReward,
    Reward,
    RewardError,
    RewardInputs,
    WeightedReward,
    compute_rewards,
)
from gspo_lightning.rewards.combine import check_weights


class LengthReward(Reward):
    """Number of characters."""

    def score_sample(self, prompt, completion, answer):
        return len(completion)


class Failing(Reward):
    """Raises on completions containing 'boom'."""

    def score_sample(self, prompt, completion, answer):
        if "boom" in completion:
            raise ZeroDivisionError("kaput")
        return 1.0


class Returns(Reward):
    """Returns a fixed object from the batched path."""

    def __init__(self, value, name=None):
        super().__init__(name)
        self.value = value

    def score(self, inputs):
        return self.value


def test_score_sample_loop_and_validation():
    inputs = make_inputs(["a", "bcd", ""])
    out = LengthReward()(inputs)
    assert out.dtype == torch.float32 and out.shape == (3,)
    torch.testing.assert_close(out, torch.tensor([1.0, 3.0, 0.0]))


def test_bool_and_int_scores_are_cast_to_float32():
    inputs = make_inputs(["a", "b"])
    torch.testing.assert_close(Returns(torch.tensor([True, False]))(inputs), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(Returns([2, 3])(inputs), torch.tensor([2.0, 3.0]))


def test_raising_reward_names_reward_sample_and_completion():
    long_tail = "x" * 200
    inputs = make_inputs(["fine", "fine", "boom " + long_tail])
    with pytest.raises(RewardError) as info:
        Failing(name="my_check")(inputs)
    msg = str(info.value)
    assert "'my_check'" in msg and "sample 2" in msg and "ZeroDivisionError: kaput" in msg
    assert "boom xxx" in msg and long_tail not in msg  # a short excerpt, not the whole completion
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_batched_failure_is_wrapped_with_the_reward_name():
    class BatchedFailing(Reward):
        """Fails."""

        def score(self, inputs):
            raise KeyError("missing")

    with pytest.raises(RewardError, match="'BatchedFailing' failed: KeyError") as info:
        BatchedFailing()(make_inputs(["a"]))
    assert isinstance(info.value.__cause__, KeyError)


def test_nan_and_inf_are_reported_with_the_sample_index():
    inputs = make_inputs(["a", "b", "c"])
    with pytest.raises(RewardError, match=r"'Returns' returned a non-finite score nan for sample 1"):
        Returns(torch.tensor([0.0, float("nan"), float("inf")]))(inputs)
    with pytest.raises(RewardError, match="non-finite score inf for sample 2"):
        Returns([0.0, 1.0, float("inf")])(inputs)


@pytest.mark.parametrize("value", [torch.zeros(2), torch.zeros(3, 1), [1.0, 2.0, 3.0, 4.0]])
def test_wrong_shape_is_an_error(value):
    with pytest.raises(RewardError, match=r"returned shape .* expected \(3,\)"):
        Returns(value)(make_inputs(["a", "b", "c"]))


def test_non_numeric_output_is_an_error():
    with pytest.raises(RewardError, match="'Returns' returned str"):
        Returns("high")(make_inputs(["a"]))


def test_a_reward_must_implement_one_method():
    class Nothing(Reward):
        """Implements nothing."""

    with pytest.raises(RewardError, match="must implement score\\(\\) or score_sample\\(\\)"):
        Nothing()(make_inputs(["a"]))


def test_name_defaults_to_class_name_and_can_be_set():
    assert LengthReward().name == "LengthReward"
    assert ExactMatchReward(name="em").name == "em"

    class NoSuperInit(LengthReward):
        """Skips Reward.__init__."""

        def __init__(self):
            pass

    assert NoSuperInit().name == "NoSuperInit"

    class SetsName(LengthReward):
        """Assigns self.name."""

        def __init__(self):
            self.name = "chars"

    assert SetsName().name == "chars"


def test_inputs_sizes_are_checked():
    with pytest.raises(ValueError, match="2 completions, but 1 prompts"):
        RewardInputs(["p"], ["a", "b"], [None, None], torch.tensor([1, 2]), torch.tensor([False, False]), 8)
    with pytest.raises(ValueError, match="response_lengths of shape \\(3,\\)"):
        RewardInputs(["p"], ["a"], [None], torch.tensor([1, 2, 3]), torch.tensor([False]), 8)


def test_compute_rewards_weighted_sum_and_terms():
    inputs = make_inputs(["57", "ab", "5"], answers=["57", "57", "5"])
    total, terms = compute_rewards([ExactMatchReward(), LengthReward()], [2.0, -0.5], inputs)
    # exact = (1, 0, 1), length = (2, 2, 1): total = 2 * exact - 0.5 * length = (1, -1, 1.5)
    torch.testing.assert_close(total, torch.tensor([1.0, -1.0, 1.5]))
    assert list(terms) == ["ExactMatchReward", "LengthReward"]
    torch.testing.assert_close(terms["LengthReward"], torch.tensor([2.0, 2.0, 1.0]))  # unweighted


def test_compute_rewards_default_weights_and_duplicate_names():
    inputs = make_inputs(["ab", "c"])
    total, terms = compute_rewards([LengthReward(), LengthReward(), LengthReward()], None, inputs)
    assert list(terms) == ["LengthReward", "LengthReward_1", "LengthReward_2"]
    torch.testing.assert_close(total, torch.tensor([6.0, 3.0]))


def test_compute_rewards_rejects_bad_configs():
    inputs = make_inputs(["a"])
    with pytest.raises(ValueError, match="No rewards given"):
        compute_rewards([], None, inputs)
    with pytest.raises(ValueError, match=r"^data\.reward_weights has 1 weights for 2 rewards; give one each"):
        compute_rewards([LengthReward(), LengthReward()], [1.0], inputs)
    with pytest.raises(ValueError, match=r"^data\.reward_weights must be finite numbers, got \[nan\]\.$"):
        compute_rewards([LengthReward()], [float("nan")], inputs)
    with pytest.raises(RewardError, match="'Failing' failed on sample 0"):
        compute_rewards([LengthReward(), Failing()], None, make_inputs(["boom"]))


def test_check_weights_defaults_to_one_each_and_names_the_option():
    assert check_weights(3, None) == [1.0, 1.0, 1.0]
    assert check_weights(2, [2, -0.5]) == [2.0, -0.5]
    with pytest.raises(ValueError, match=r"^data\.reward_weights has 2 weights for 1 rewards"):
        check_weights(1, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"^my\.weights must be finite numbers"):
        check_weights(1, [float("inf")], option="my.weights")


def test_weighted_reward_is_a_reward():
    inputs = make_inputs(["57", "abc"], answers=["57", "57"])
    combined = WeightedReward([ExactMatchReward(), LengthReward()], weights=[1.0, 0.1])
    # (1 + 0.1 * 2, 0 + 0.1 * 3)
    torch.testing.assert_close(combined(inputs), torch.tensor([1.2, 0.3]))
    _, terms = combined.terms(inputs)
    assert set(terms) == {"ExactMatchReward", "LengthReward"}
    with pytest.raises(ValueError, match="^WeightedReward weights has 2 weights for 1 rewards; give one each"):
        WeightedReward([LengthReward()], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="No rewards given"):
        WeightedReward([])


@pytest.mark.parametrize(
    ("scores", "bad"),
    [
        ([1.0, None, 0.0], "a NoneType \\(None\\)"),
        ([1.0, 0.0, "0.5"], "a str \\('0.5'\\)"),
        ([None, "x", 1], "a NoneType \\(None\\)"),
    ],
)
def test_batched_none_or_string_score_names_the_element(scores, bad):
    index = next(i for i, s in enumerate(scores) if not isinstance(s, (int, float)))
    with pytest.raises(RewardError) as info:
        Returns(scores, name="judge")(make_inputs(["a", "b", "c"]))
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(f"'judge' returned {bad} for sample {index} ", msg), msg
    assert "return 3 numbers" in msg  # what to return instead


@pytest.mark.parametrize(("value", "bad"), [(None, "a NoneType \\(None\\)"), ("1", "a str \\('1'\\)")])
def test_per_sample_none_or_string_score_is_refused(value, bad):
    class Sometimes(Reward):
        """Returns ``value`` for completions containing 'odd'."""

        def score_sample(self, prompt, completion, answer):
            return value if "odd" in completion else 1.0

    with pytest.raises(RewardError) as info:
        Sometimes()(make_inputs(["fine", "odd one"]))
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(f"'Sometimes' returned {bad} for sample 1 \\(completion 'odd one'\\)", msg), msg
    assert "must return a float" in msg


def test_none_instead_of_a_list_says_what_to_return():
    with pytest.raises(RewardError, match=r"'Returns' returned NoneType \(None\), not 2 scores; return 2 numbers"):
        Returns(None)(make_inputs(["a", "b"]))
