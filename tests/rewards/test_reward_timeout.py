"""Per-call reward timeouts (``timeout_s``): the slow reward is named, the run never hangs, YAML sets it."""

import copy
import pickle
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from jsonargparse import ArgumentParser
from reward_inputs import make_inputs

from gspo_lightning.rewards import REWARDS, FunctionReward, MathAnswerReward, Reward, RewardError

# never set: a stuck call stays blocked in a lock wait, where its daemon thread is harmless at exit (woken up
# during interpreter shutdown, a thread that runs torch code aborts the process)
NEVER = threading.Event()


def stuck(prompts, completions, answers):
    """A reward function that hangs."""
    NEVER.wait()
    return [0.0] * len(completions)


class ThreadRecorder(Reward):
    """Records the thread each call runs in; hangs on completions containing 'hang'."""

    def __init__(self, timeout_s: float | None = None) -> None:
        super().__init__(timeout_s=timeout_s)
        self.threads: list[threading.Thread] = []

    def score_sample(self, prompt, completion, answer):
        self.threads.append(threading.current_thread())
        if "hang" in completion:
            NEVER.wait()
        if "boom" in completion:
            raise ZeroDivisionError("kaput")
        return float(len(completion))


def test_a_hanging_reward_times_out_with_one_clear_line():
    reward = FunctionReward(stuck, name="slow", timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        reward(make_inputs(["a", "b"]))
    assert time.monotonic() - start < 5
    assert str(info.value) == (
        "Reward 'slow' took longer than 0.2 s on a batch of 2 completions; raise timeout_s or fix the reward."
    )


def test_scores_run_off_the_main_thread_on_one_reused_worker():
    reward = ThreadRecorder(timeout_s=30)
    torch.testing.assert_close(reward(make_inputs(["ab", "c"])), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(reward(make_inputs(["abcd"])), torch.tensor([4.0]))
    assert len({t.ident for t in reward.threads}) == 1
    assert reward.threads[0] is not threading.main_thread()


def test_the_worker_runs_under_the_callers_grad_mode():
    seen = []

    def grad_mode(prompts, completions, answers):
        seen.append(torch.is_grad_enabled())
        return [0.0] * len(completions)

    reward = FunctionReward(grad_mode, timeout_s=30)
    with torch.no_grad():
        reward(make_inputs(["a"]))
    reward(make_inputs(["a"]))
    assert seen == [False, True]


def test_a_reward_raising_timeout_error_is_not_taken_for_a_timeout():
    def raises(prompts, completions, answers):
        raise TimeoutError("judge API timed out")

    with pytest.raises(RewardError, match="'raises' failed: TimeoutError: judge API timed out"):
        FunctionReward(raises, timeout_s=30)(make_inputs(["a"]))


def test_without_a_timeout_scores_run_in_the_calling_thread():
    reward = ThreadRecorder()
    assert reward.timeout_s is None
    reward(make_inputs(["ab"]))
    assert reward.threads == [threading.current_thread()]


def test_after_a_timeout_the_next_call_gets_a_fresh_worker():
    reward = ThreadRecorder(timeout_s=0.2)
    with pytest.raises(RewardError, match="'ThreadRecorder' took longer than 0.2 s on a batch of 1 completions"):
        reward(make_inputs(["hang"]))
    torch.testing.assert_close(reward(make_inputs(["abc"])), torch.tensor([3.0]))  # not queued behind it
    assert reward.threads[0] is not reward.threads[1]


def test_failures_in_the_worker_keep_their_messages():
    with pytest.raises(RewardError, match="'ThreadRecorder' failed on sample 1.*ZeroDivisionError: kaput"):
        ThreadRecorder(timeout_s=30)(make_inputs(["a", "boom"]))
    with pytest.raises(RewardError, match="non-finite score nan for sample 0"):
        FunctionReward(lambda p, c, a: [float("nan")], timeout_s=30)(make_inputs(["a"]))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_invalid_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match=r"^timeout_s must be a number of seconds > 0 \(or None for no limit\), got "):
        FunctionReward(stuck, timeout_s=bad)


def test_a_reward_with_a_worker_still_copies_and_pickles():
    reward = MathAnswerReward(timeout_s=30)
    reward(make_inputs(["\\boxed{57}"], ["57"]))  # starts the worker
    for clone in (copy.deepcopy(reward), pickle.loads(pickle.dumps(reward))):
        assert clone.timeout_s == 30
        torch.testing.assert_close(clone(make_inputs(["\\boxed{57}", "1"], ["57", "57"])), torch.tensor([1.0, 0.0]))


def test_math_answer_reward_in_the_worker_thread():
    # math-verify's own timeout is signal-based and off outside the main thread; timeout_s bounds the call
    reward = MathAnswerReward(timeout_s=30)
    out = reward(make_inputs(["\\boxed{\\frac{1}{2}}", "58"], ["0.5", "57"]))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0]))


def _build(config: dict) -> Reward:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    return parser.instantiate(parser.parse_object({"reward": config})).reward


REQUIRED_ARGS = {
    "FunctionReward": {"fn": f"{__name__}.stuck"},
    "RegexFormatReward": {"pattern": "57"},
    "WeightedReward": {"rewards": [{"class_path": "ExactMatchReward"}]},
}


@pytest.mark.parametrize("entry", REWARDS.describe(), ids=lambda e: e.name)
def test_every_registered_reward_takes_timeout_s_from_yaml(entry):
    reward = _build({"class_path": entry.name, "init_args": {**REQUIRED_ARGS.get(entry.name, {}), "timeout_s": 5}})
    assert type(reward) is entry.cls and reward.timeout_s == 5.0


def test_a_stuck_reward_does_not_keep_the_process_alive():
    script = textwrap.dedent(
        """
        import time
        from gspo_lightning.rewards import FunctionReward, RewardError, RewardInputs

        def forever(prompts, completions, answers):
            time.sleep(3600)

        inputs = RewardInputs(["p"], ["c"], [None], [1], [False], 8)
        try:
            FunctionReward(forever, timeout_s=0.2)(inputs)
        except RewardError as e:
            print(e)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'forever' took longer than 0.2 s on a batch of 1 completions" in result.stdout
