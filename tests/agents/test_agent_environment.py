"""Stateful environments: one per trajectory, tools from public methods, per-turn rewards summed, TrajectoryReward."""

import pytest
import torch
from scripted import ScriptedEngine, call_text, chat_tokenizer, prompts, tool_runner, turn

from gspo_lightning.agents import Environment, Step, Turn
from gspo_lightning.agents.parsers import ParsedTurn
from gspo_lightning.rewards import RewardError, RewardInputs, TrajectoryReward
from gspo_lightning.rollout.collector import decode_responses, reward_inputs, transcripts


class Counter(Environment):
    """Counts up to the prompt's answer with its ``bump`` tool; every turn's reward is given in ``step``."""

    instances: list["Counter"] = []  # noqa: RUF012 - records every instance built (one per trajectory)

    def __init__(self) -> None:
        self.total = 0
        self.target = None
        self.rewards: list[float] = []
        Counter.instances.append(self)

    def reset(self, prompt: str, answer: str | None, **columns) -> None:
        self.total, self.target = 0, int(answer)

    def bump(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: how much to add.
        """
        self.total += by
        return self.total

    def peek(self) -> int:
        """The counter's value."""
        return self.total

    def _secret(self) -> int:
        return 42

    @property
    def value(self) -> int:
        return self.total

    @staticmethod
    def helper(x: int) -> int:
        return x

    def step(self, turn: Turn) -> Step:
        if turn.parsed.has_calls:
            step = self.run_tools(turn.parsed)
            step.reward = 0.1  # a shaping reward per tool turn
        else:
            step = Step(done=True, reward=1.0 if turn.text.strip() == str(self.target) else -1.0)
        self.rewards.append(step.reward)
        return step


def test_tools_are_the_public_methods_only():
    env = Counter()
    assert [m.__name__ for m in env.tools()] == ["bump", "peek"]
    assert env.toolbox().names == ["bump", "peek"]
    assert env.toolbox() is env.toolbox()  # built once
    assert Environment().tools() == []


def test_a_public_method_without_docstring_is_refused():
    class Sloppy(Environment):
        def act(self, x: int) -> int:
            return x

    with pytest.raises(ValueError, match="docstring"):
        Sloppy().toolbox()


def test_default_step_runs_tools_then_ends_without_calls():
    env = Counter()
    env.reset("", "3")
    parsed = ParsedTurn(calls=[], errors=["Error: bad"])
    assert Environment.step(env, Turn("x", ParsedTurn(), 0)) == Step(done=True)
    step = Environment.step(env, Turn("x", parsed, 0))
    assert step.messages == [{"role": "tool", "content": "Error: bad"}] and (step.tool_calls, step.tool_errors) == (
        1,
        1,
    )


def test_stateful_environment_rewards_are_summed_per_trajectory():
    tok = chat_tokenizer()
    bump2 = turn(tok, call_text("bump", by=2))
    bump1 = turn(tok, call_text("bump", by=1))

    def script(call, context, sample):
        # sample 0 bumps twice then answers 3 (right for "3", wrong for "4"); sample 1 answers at once
        if sample == 0 and call < 2:
            return bump2 if call == 0 else bump1
        return turn(tok, "3")

    Counter.instances.clear()
    engine = ScriptedEngine(tok, script)
    runner = tool_runner(engine, environment=Counter)
    ps = prompts(tok, ["count to 3", "count to 4"], runner.renderer.tools, answers=["3", "4"])
    Counter.instances.clear()
    gen = runner.run(ps, 2)
    trajs = gen.trajectories

    assert len(Counter.instances) == 4  # one environment per trajectory, reset from its own row
    assert [env.total for env in Counter.instances] == [3, 0, 3, 0]
    assert [env.target for env in Counter.instances] == [3, 3, 4, 4]
    assert [env.rewards for env in Counter.instances] == [[0.1, 0.1, 1.0], [1.0], [0.1, 0.1, -1.0], [-1.0]]
    assert [t.reward for t in trajs] == pytest.approx([1.2, 1.0, -0.8, -1.0])
    assert [t.tool_calls for t in trajs] == [2, 0, 2, 0]
    # the tool results the model saw are the running totals
    suffix = runner.renderer.ids([{"role": "tool", "name": "bump", "content": "2"}])
    suffix2 = runner.renderer.ids([{"role": "tool", "name": "bump", "content": "3"}])
    assert trajs[0].completion_ids == bump2 + suffix + bump1 + suffix2 + turn(tok, "3")

    # the rewards see the returns through RewardInputs; TrajectoryReward scores them as they are
    completions = decode_responses(tok, gen)
    assert completions == ["3"] * 4
    inputs = reward_inputs(ps, gen, completions, 2, engine.sampling.max_new_tokens, transcripts(tok, gen))
    torch.testing.assert_close(TrajectoryReward()(inputs), torch.tensor([1.2, 1.0, -0.8, -1.0]))
    assert (
        inputs.transcripts[0].startswith("<tool_call>") and "<tool_response>2</tool_response>" in inputs.transcripts[0]
    )
    assert inputs.response_lengths.tolist() == [sum(t.loss_mask) for t in trajs]  # model tokens only


def test_trajectory_reward_refuses_single_turn_rollouts():
    inputs = RewardInputs(
        prompts=["p"], completions=["c"], answers=["a"], response_lengths=[1], truncated=[False], max_new_tokens=4
    )
    with pytest.raises(RewardError, match="single-turn"):
        TrajectoryReward()(inputs)
