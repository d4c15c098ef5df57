"""MathAnswerReward: math-verify equivalences, extraction modes, None answers, threads and timeouts."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from reward_inputs import make_inputs

import gspo_lightning.rewards.answer as answer_module
from gspo_lightning.rewards import MathAnswerReward, RewardError

# (completion, reference, correct?)
MATH_CASES = [
    ("57", "57", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}", True),
    ("We get 3 apples, so the total is \\boxed{57}.", "57", True),
    ("\\boxed{57} (checking: 12)", "57", True),  # the boxed answer wins over a later number
    ("1,000", "1000", True),
    ("57.0", "57", True),
    ("The area is $3\\pi$", "3\\pi", True),  # a bare LaTeX reference is wrapped in $...$ to parse
    ("58", "57", False),
    ("\\boxed{3}", "3\\pi", False),
    ("no idea", "57", False),
    ("", "57", False),
]


@pytest.mark.parametrize(("completion", "answer", "correct"), MATH_CASES)
def test_math_answer_equivalences(completion, answer, correct):
    out = MathAnswerReward(correct=1.0, incorrect=-0.5)(make_inputs([completion], [answer]))
    torch.testing.assert_close(out, torch.tensor([1.0 if correct else -0.5]))


def test_math_text_references_parse_as_symbol_products():
    # math-verify reads "Paris" as the product P*a*r*i*s: equal words match, other words do not
    reward = MathAnswerReward()
    assert reward.is_correct("\\boxed{Paris}", "Paris")
    assert not reward.is_correct("\\boxed{Rome}", "Paris")


def test_math_unparseable_reference_falls_back_to_numbers_then_text(monkeypatch):
    monkeypatch.setattr(answer_module, "_parse_reference", lambda answer, timeout: ())
    reward = MathAnswerReward()
    assert reward.is_correct("the total is \\boxed{57.0}", "57")  # numeric: 57.0 == 57
    assert reward.is_correct("1,000", "1000")
    assert not reward.is_correct("\\boxed{58}", "57")
    assert reward.is_correct(" ??? ", "???")  # neither side numeric: stripped text equality
    assert not reward.is_correct("!!!", "???")


def test_math_strict_extraction_needs_a_marked_answer():
    strict = MathAnswerReward(extract_boxed_or_last=False)
    out = strict(make_inputs(["so 3 then 57", "so 3 then \\boxed{57}", "The final answer is 57"]))
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 1.0]))


def test_math_none_answer_is_a_clear_error():
    with pytest.raises(RewardError, match="sample 1.*needs a reference answer.*answer=None"):
        MathAnswerReward()(make_inputs(["57", "57"], ["57", None]))


def test_math_works_in_worker_threads():
    # math-verify's default signal-based timeout raises ValueError outside the main thread
    reward = MathAnswerReward()
    inputs = make_inputs(["\\boxed{\\frac{1}{2}}", "58"], ["0.5", "57"])
    with ThreadPoolExecutor(max_workers=1) as pool:
        out = pool.submit(reward, inputs).result()
    assert threading.current_thread() is threading.main_thread()
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))


def test_math_verify_timeout_applies_in_the_main_thread():
    # comparing 9^(9^(9^9)) with 57 makes sympy run for minutes; the 1 s alarm turns it into a miss
    start = time.monotonic()
    out = MathAnswerReward(verify_timeout_s=1)(make_inputs(["\\boxed{9^{9^{9^{9}}}}"], ["57"]))
    assert time.monotonic() - start < 10
    torch.testing.assert_close(out, torch.tensor([0.0]))


def test_math_verify_timeout_and_call_timeout_are_two_options():
    # verify_timeout_s is math-verify's (a slow sample scores incorrect); timeout_s bounds the whole call
    reward = MathAnswerReward(verify_timeout_s=2, timeout_s=30)
    assert (reward.verify_timeout_s, reward.timeout_s) == (2, 30.0)
    assert MathAnswerReward().verify_timeout_s == 5 and MathAnswerReward().timeout_s is None
    with pytest.raises(ValueError, match=r"^verify_timeout_s must be >= 0 or None, got -1\.$"):
        MathAnswerReward(verify_timeout_s=-1)
