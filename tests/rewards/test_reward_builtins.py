"""The non-math built-in rewards on hand-worked cases, and every registered reward on a small batch."""

import pytest
import torch
from reward_inputs import make_inputs

from gspo_lightning.rewards import (
    REWARDS,
    ExactMatchReward,
    FunctionReward,
    OverlongPenalty,
    RegexFormatReward,
    RewardError,
)


def test_exact_match():
    inputs = make_inputs(["57", " 57\n", "057", "Yes"], ["57", "57", "57", "yes"])
    torch.testing.assert_close(ExactMatchReward()(inputs), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(ExactMatchReward(strip=False)(inputs), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    loose = ExactMatchReward(correct=2.0, incorrect=-1.0, case_sensitive=False)
    torch.testing.assert_close(loose(inputs), torch.tensor([2.0, 2.0, -1.0, 2.0]))
    with pytest.raises(RewardError, match="sample 0.*needs a reference answer"):
        ExactMatchReward()(make_inputs(["57"], [None]))


def test_regex_format():
    texts = ["<think>\nhmm\n</think> 57", "57 <think>x</think>", "57"]
    search = RegexFormatReward(r"<think>.*</think>")
    torch.testing.assert_close(search(make_inputs(texts)), torch.tensor([0.0, 1.0, 0.0]))  # . skips \n
    full = RegexFormatReward(r"(?s)<think>.*</think>.*", match_score=0.5, miss_score=-1.0, mode="fullmatch")
    torch.testing.assert_close(full(make_inputs(texts)), torch.tensor([0.5, -1.0, -1.0]))


def test_regex_format_invalid_arguments():
    with pytest.raises(ValueError, match="invalid regular expression '\\(unclosed'"):
        RegexFormatReward("(unclosed")
    with pytest.raises(ValueError, match="mode must be 'search' or 'fullmatch'"):
        RegexFormatReward("a", mode="match")


def test_overlong_penalty_hand_worked():
    # L_max = 10, L_cache = 4: no penalty up to L_max - L_cache = 6, then (6 - L) / 4 * penalty
    # L = 7: -1/4, L = 8: -2/4, L = 9: -3/4, L = 10 (= L_max): -1; times penalty = 2
    lengths = [0, 5, 6, 7, 8, 9, 10]
    reward = OverlongPenalty(max_new_tokens=10, buffer=4, penalty=2.0)
    out = reward(make_inputs(["x"] * 7, lengths=lengths, max_new_tokens=10))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0, -1.5, -2.0]))


def test_overlong_penalty_defaults_to_the_generation_limit():
    # max_new_tokens from the inputs (20), buffer = 20 // 5 = 4: ramp from 16; L = 18: (16 - 18) / 4 = -0.5
    out = OverlongPenalty()(make_inputs(["x"] * 3, lengths=[16, 18, 20], max_new_tokens=20))
    torch.testing.assert_close(out, torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_own_limit_below_generation_limit():
    # expected length 8 with buffer 2 while generating up to 12: L = 7 -> (6 - 7) / 2 = -0.5; L >= 8 -> -1
    out = OverlongPenalty(max_new_tokens=8, buffer=2)(make_inputs(["x"] * 3, lengths=[7, 8, 12], max_new_tokens=12))
    torch.testing.assert_close(out, torch.tensor([-0.5, -1.0, -1.0]))


def test_overlong_penalty_zero_buffer_is_a_step():
    out = OverlongPenalty(buffer=0)(make_inputs(["x"] * 2, lengths=[9, 10], max_new_tokens=10))
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0]))


def test_overlong_penalty_validation():
    with pytest.raises(ValueError, match="buffer \\(10\\) must be smaller than max_new_tokens \\(10\\)"):
        OverlongPenalty(max_new_tokens=10, buffer=10)
    with pytest.raises(RewardError, match="buffer \\(100\\) must be smaller than max_new_tokens \\(64\\)"):
        OverlongPenalty(buffer=100)(make_inputs(["x"]))
    with pytest.raises(ValueError, match="penalty must be finite and >= 0"):
        OverlongPenalty(penalty=-1.0)
    with pytest.raises(ValueError, match="buffer must be >= 0"):
        OverlongPenalty(buffer=-1)


def test_function_reward_passes_the_kwargs_it_accepts():
    seen = {}

    def lengths_only(prompts, completions, answers, response_lengths):
        seen["args"] = (prompts, completions, answers)
        return response_lengths * 0.5

    def everything(prompts, completions, answers, **kwargs):
        seen["kwargs"] = sorted(kwargs)
        return [float(kwargs["max_new_tokens"])] * len(completions)

    inputs = make_inputs(["ab", "c"], lengths=[4, 6], max_new_tokens=8)
    reward = FunctionReward(lengths_only)
    assert reward.name == "lengths_only"
    torch.testing.assert_close(reward(inputs), torch.tensor([2.0, 3.0]))
    assert seen["args"] == (["prompt 0", "prompt 1"], ["ab", "c"], ["57", "57"])
    torch.testing.assert_close(FunctionReward(everything, name="e")(inputs), torch.tensor([8.0, 8.0]))
    assert seen["kwargs"] == ["max_new_tokens", "response_lengths", "truncated"]
    assert FunctionReward(lambda p, c, a: [0.0] * len(c)).name == "FunctionReward"


def test_function_reward_errors():
    with pytest.raises(TypeError, match="needs a callable fn"):
        FunctionReward("not_imported.fn")
    with pytest.raises(RewardError, match="'short' returned shape \\(1,\\) .*expected \\(2,\\)"):
        FunctionReward(lambda p, c, a: [1.0], name="short")(make_inputs(["a", "b"]))
    with pytest.raises(RewardError, match=r"'bad' returned int \(3\), not 1 scores; return 1 numbers"):
        FunctionReward(lambda p, c, a: 3, name="bad")(make_inputs(["a"]))


def judge(prompts, completions, answers):
    """A user's function that forgets a case (None) and one that returns the model's text ("0.5")."""
    return [None if c == "skip" else ("0.5" if c == "text" else 1.0) for c in completions]


@pytest.mark.parametrize(
    ("completions", "index", "bad"), [(["a", "skip"], 1, "NoneType (None)"), (["text"], 0, "str ('0.5')")]
)
def test_function_reward_none_or_string_names_reward_element_and_fix(completions, index, bad):
    with pytest.raises(RewardError) as info:
        FunctionReward(judge)(make_inputs(completions))
    msg = str(info.value)
    n = len(completions)
    assert "\n" not in msg and "fn returned list" not in msg
    assert f"Reward 'judge' returned a {bad} for sample {index} " in msg, msg
    assert f"return {n} numbers (a list of floats or a ({n},) tensor)" in msg, msg


def _batch_score(prompts, completions, answers):
    return [1.0] * len(completions)


REQUIRED_ARGS = {
    "FunctionReward": {"fn": _batch_score},
    "RegexFormatReward": {"pattern": "57"},
    "WeightedReward": {"rewards": [ExactMatchReward(), OverlongPenalty()]},
}


@pytest.mark.parametrize("entry", REWARDS.describe(), ids=lambda e: e.name)
def test_every_registered_reward(entry):
    assert entry.description and "\n" not in entry.description
    reward = REWARDS.build(entry.name, **REQUIRED_ARGS.get(entry.name, {}))
    inputs = make_inputs(["57", "\\boxed{57}", "x" * 64, ""], lengths=[2, 10, 64, 0], max_new_tokens=64)
    inputs.trajectory_rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])  # what multi-turn rollouts add (TrajectoryReward)
    out = reward(inputs)
    assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_registry_holds_the_built_ins():
    expected = {
        "ExactMatchReward",
        "FunctionReward",
        "MathAnswerReward",
        "OverlongPenalty",
        "RegexFormatReward",
        "WeightedReward",
    }
    assert expected <= set(REWARDS.names())
