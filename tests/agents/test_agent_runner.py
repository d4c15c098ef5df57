"""AgentRunner with a scripted engine: token-in/token-out exactness, the limits, the counts and the metrics."""

import pytest
import torch
from scripted import (
    ScriptedEngine,
    add,
    call_text,
    chat_tokenizer,
    encode,
    made_up_logprob,
    prompts,
    tool_runner,
    turn,
)

from gspo_lightning.agents import ToolCall
from gspo_lightning.agents.metrics import agent_metrics
from gspo_lightning.agents.parsers import HermesToolParser
from gspo_lightning.agents.trajectory import Trajectory


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def fails(x: int) -> int:
    """Always fails.

    Args:
        x: ignored.
    """
    raise RuntimeError("broken tool")


def echo(n: int) -> str:
    """A long answer.

    Args:
        n: its length.
    """
    return "x" * n


def tool_message(content: str, name: str | None = None) -> dict:
    return {"role": "tool", "content": content} if name is None else {"role": "tool", "name": name, "content": content}


# -- (a) token exactness ---------------------------------------------------------------------------------------


def test_trajectory_ids_are_prompt_sampled_ids_and_rendered_tool_messages(tok):
    call0 = turn(tok, call_text("add", a=1, b=2))
    answer = turn(tok, "the sum is 3")
    direct = turn(tok, "7")

    def script(call, context, sample):
        if call == 0:
            return call0 if sample == 0 else direct
        return answer

    engine = ScriptedEngine(tok, script)
    runner = tool_runner(engine)
    ps = prompts(tok, ["1+2", "3+4"], runner.renderer.tools)
    gen = runner.run(ps, num_samples=2)
    trajs = gen.trajectories
    assert len(trajs) == 4 and gen.response_ids.shape[0] == 4
    suffix = runner.renderer.ids([tool_message("3", "add")])
    assert suffix == encode(tok, "<|user|><tool_response>3</tool_response><eos><|assistant|>")

    for i, t in enumerate(trajs):
        p = ps[i // 2]
        assert t.prompt_ids == p.input_ids
        if i % 2 == 0:  # called the tool, then answered
            assert t.completion_ids == call0 + suffix + answer
            assert t.loss_mask == [True] * len(call0) + [False] * len(suffix) + [True] * len(answer)
            assert (t.turns, t.tool_calls, t.tool_errors, t.end) == (2, 1, 0, "done")
            assert t.final_text == "the sum is 3"
            row1 = i // 2  # its row in the second call (trajectories 0 and 2 are active)
            expected_lp = (
                [made_up_logprob(0, i, j) for j in range(len(call0))]
                + [0.0] * len(suffix)
                + [made_up_logprob(1, row1, j) for j in range(len(answer))]
            )
        else:
            assert t.completion_ids == direct and t.loss_mask == [True] * len(direct)
            assert (t.turns, t.tool_calls, t.end) == (1, 0, "done")
            expected_lp = [made_up_logprob(0, i, j) for j in range(len(direct))]
        assert t.logprobs == pytest.approx(expected_lp, abs=1e-7)

    # the engine saw exactly the contexts so far: the prompts once (G samples each), then each active trajectory
    assert len(engine.calls) == 2
    assert engine.calls[0]["prompt_ids"] == [ps[0].input_ids, ps[1].input_ids]
    assert engine.calls[0]["num_samples"] == 2
    assert engine.calls[1]["prompt_ids"] == [ps[0].input_ids + call0 + suffix, ps[1].input_ids + call0 + suffix]
    assert engine.calls[1]["num_samples"] == 1
    assert all(c["max_new_tokens"] is None for c in engine.calls)  # no budget: no per-row limits

    # the Generation: every real token in response_mask, the sampled ones in loss_mask, log-probs 0 off it
    lengths = torch.tensor([len(t.completion_ids) for t in trajs])
    real = torch.arange(gen.response_ids.shape[1])[None, :] < lengths[:, None]
    assert torch.equal(gen.response_mask, real)
    for i, t in enumerate(trajs):
        k = len(t.completion_ids)
        assert gen.response_ids[i, :k].tolist() == t.completion_ids
        assert gen.loss_mask[i, :k].tolist() == t.loss_mask and not gen.loss_mask[i, k:].any()
        torch.testing.assert_close(gen.logprobs[i, :k], torch.tensor(t.logprobs).masked_fill(~gen.loss_mask[i, :k], 0))
    assert (gen.logprobs[~gen.loss_mask] == 0).all() and (gen.logprobs[gen.loss_mask] < 0).all()
    assert not gen.truncated.any()
    assert torch.equal(gen.sampled_mask, gen.loss_mask)


def test_engine_ids_are_kept_even_when_re_rendering_would_change_them(tok):
    """The model emits a stray <bos> and <unk> and a call in its own spacing: decoding drops the special ids and
    the template writes calls its own way, so any re-rendering of the conversation gives other ids."""
    bos, unk = tok.bos_token_id, tok.unk_token_id
    spaced = '<tool_call> {"name" :  "add", "arguments": {"a":1,"b":2}} </tool_call>'
    call0 = [bos, *encode(tok, spaced), unk, tok.eos_token_id]
    answer = [*encode(tok, "3"), bos, tok.eos_token_id]

    engine = ScriptedEngine(tok, lambda call, context, sample: call0 if call == 0 else answer)
    runner = tool_runner(engine)
    ps = prompts(tok, ["1+2"], runner.renderer.tools)
    (t,) = runner.run(ps, num_samples=1).trajectories
    suffix = runner.renderer.ids([tool_message("3", "add")])
    assert t.completion_ids == call0 + suffix + answer
    assert t.tool_calls == 1 and t.tool_errors == 0  # the spaced call still parsed
    assert engine.calls[1]["prompt_ids"] == [ps[0].input_ids + call0 + suffix]

    # what a re-rendering of the same conversation (decoded turns, the template's own tool-call text) would give
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    conversation = [
        {"role": "user", "content": "1+2"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        tool_message("3", "add"),
        {"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)},
    ]
    rerendered = tok.apply_chat_template(conversation, tools=runner.renderer.tools, tokenize=False)
    from_messages = tok.apply_chat_template(
        [{"role": "user", "content": "1+2"}, *t.messages], tools=runner.renderer.tools, tokenize=False
    )
    for text in (rerendered, from_messages):
        assert encode(tok, text) != t.prompt_ids + t.completion_ids
    assert tok.decode(call0, skip_special_tokens=True) == spaced  # the decoded turn lost <bos> and <unk>


# -- (b) limits and failures ------------------------------------------------------------------------------------


def test_max_turns_ends_a_trajectory_that_keeps_calling(tok):
    call0 = turn(tok, call_text("add", a=1, b=1))
    engine = ScriptedEngine(tok, lambda call, context, sample: call0)
    runner = tool_runner(engine, max_turns=3)
    (t,) = runner.run(prompts(tok, ["1+1"], runner.renderer.tools), 1).trajectories
    suffix = runner.renderer.ids([tool_message("2", "add")])
    assert (t.turns, t.end) == (3, "max_turns") and len(engine.calls) == 3
    assert t.completion_ids == call0 + suffix + call0 + suffix + call0  # nothing appended after the last turn
    assert t.loss_mask[-1] and not t.truncated


def test_budget_passes_per_row_limits_and_ends_with_budget(tok):
    call0 = turn(tok, call_text("add", a=1, b=2))
    long_answer = encode(tok, "abcdefghijklmnopqrst")  # 20 tokens, no EOS
    engine = ScriptedEngine(tok, lambda call, context, sample: call0 if call == 0 else long_answer, max_new_tokens=64)
    schemas_runner = tool_runner(engine)
    ps = prompts(tok, ["1+2", "10+20"], schemas_runner.renderer.tools)
    suffix = schemas_runner.renderer.ids([tool_message("3", "add")])
    p0, p1 = len(ps[0].input_ids), len(ps[1].input_ids)
    assert p1 == p0 + 2
    budget = p1 + len(call0) + len(suffix) + 5  # the second prompt has 5 tokens left for its answer, the first 7
    runner = tool_runner(engine, max_tokens=budget)
    gen = runner.run(ps, 1)
    assert engine.calls[0]["max_new_tokens"] == [budget - p0, budget - p1]  # rooms < 64: one limit per prompt
    assert engine.calls[1]["max_new_tokens"] == [7, 5]
    for t, room in zip(gen.trajectories, (7, 5), strict=True):
        assert t.end == "budget" and t.truncated
        assert len(t.prompt_ids) + len(t.completion_ids) == budget
        assert t.completion_ids == call0 + suffix + long_answer[:room]
    assert gen.truncated.all()


def test_budget_cuts_an_engine_that_overshoots(tok):
    call0 = turn(tok, call_text("add", a=1, b=2))
    answer = turn(tok, "abcdefghijklmnopqrst")
    engine = ScriptedEngine(tok, lambda c, ctx, s: call0 if c == 0 else answer, honour_limits=False, routes=True)
    probe = tool_runner(engine)
    ps = prompts(tok, ["1+2"], probe.renderer.tools)
    suffix = probe.renderer.ids([tool_message("3", "add")])
    budget = len(ps[0].input_ids) + len(call0) + len(suffix) + 4
    runner = tool_runner(engine, max_tokens=budget)
    gen = runner.run(ps, 1)
    (t,) = gen.trajectories
    assert t.end == "budget" and t.completion_ids == call0 + suffix + answer[:4]
    assert t.final_text == "abcd" and len(t.logprobs) == len(t.completion_ids)
    assert gen.routes.shape[2] == gen.prompt_ids.shape[1] + gen.response_ids.shape[1]


def test_a_prompt_longer_than_the_budget_keeps_no_token(tok):
    engine = ScriptedEngine(tok, lambda call, context, sample: turn(tok, "abcdefgh"), honour_limits=False)
    probe = tool_runner(engine)
    ps = prompts(tok, ["1+2"], probe.renderer.tools)
    runner = tool_runner(engine, max_tokens=len(ps[0].input_ids) - 3)
    gen = runner.run(ps, 1)
    (t,) = gen.trajectories
    assert (t.end, t.completion_ids, t.loss_mask) == ("budget", [], [])
    assert engine.calls[0]["max_new_tokens"] == [-3]
    assert not gen.response_mask.any()


def test_budget_leaving_no_room_after_the_tool_message_ends_before_it(tok):
    call0 = turn(tok, call_text("add", a=1, b=2))
    engine = ScriptedEngine(tok, lambda call, context, sample: call0)
    probe = tool_runner(engine)
    ps = prompts(tok, ["1+2"], probe.renderer.tools)
    suffix = probe.renderer.ids([tool_message("3", "add")])
    runner = tool_runner(engine, max_tokens=len(ps[0].input_ids) + len(call0) + len(suffix))
    (t,) = runner.run(ps, 1).trajectories
    assert (t.end, t.turns, t.completion_ids) == ("budget", 1, call0)
    assert len(engine.calls) == 1


def test_a_turn_hitting_max_new_tokens_ends_with_length(tok):
    call0 = turn(tok, call_text("add", a=1, b=2))
    engine = ScriptedEngine(tok, lambda call, context, sample: call0, max_new_tokens=10)
    runner = tool_runner(engine)
    gen = runner.run(prompts(tok, ["1+2"], runner.renderer.tools), 1)
    (t,) = gen.trajectories
    assert (t.end, t.turns, t.tool_calls) == ("length", 1, 0)  # a cut call is not run
    assert t.completion_ids == call0[:10] and gen.truncated.tolist() == [True]


def test_tool_response_cap_cuts_and_counts(tok):
    call0 = turn(tok, call_text("echo", n=50))
    engine = ScriptedEngine(tok, lambda call, context, sample: call0 if call == 0 else turn(tok, "ok"))
    runner = tool_runner(engine, tools=[echo], max_tool_response_tokens=10)
    (t,) = runner.run(prompts(tok, ["say x"], runner.renderer.tools), 1).trajectories
    suffix = runner.renderer.ids([tool_message("x" * 10 + " [truncated]", "echo")])
    assert t.completion_ids == call0 + suffix + turn(tok, "ok")
    assert (t.tool_truncated, t.tool_calls, t.tool_errors, t.end) == (1, 1, 0, "done")


def test_malformed_unknown_and_raising_calls_are_answered_and_counted(tok):
    bad = turn(tok, '<tool_call>{"name": "add", </tool_call>')
    mixed = turn(tok, call_text("fails", x=1) + call_text("nope") + call_text("add", a=2, b=2))
    first = {0: bad, 1: mixed}

    engine = ScriptedEngine(tok, lambda c, ctx, s: first[s] if c == 0 else turn(tok, "4"), max_new_tokens=256)
    runner = tool_runner(engine, tools=[add, fails])
    ps = prompts(tok, ["2+2"], runner.renderer.tools)
    gen = runner.run(ps, 2)
    t_bad, t_mixed = gen.trajectories

    error = HermesToolParser().parse(tok.decode(bad, skip_special_tokens=True)).errors
    assert len(error) == 1
    assert t_bad.completion_ids == bad + runner.renderer.ids([tool_message(error[0])]) + turn(tok, "4")
    assert (t_bad.tool_calls, t_bad.tool_errors, t_bad.end, t_bad.turns) == (1, 1, "done", 2)

    box = runner.environment()._toolbox
    answers = [
        tool_message(box.call(ToolCall("fails", {"x": 1})).text, "fails"),
        tool_message(box.call(ToolCall("nope", {})).text, "nope"),
        tool_message("4", "add"),
    ]
    assert answers[0]["content"].startswith("Error:") and "RuntimeError" in answers[0]["content"]
    assert answers[1]["content"].startswith("Error: unknown tool")
    assert t_mixed.completion_ids == mixed + runner.renderer.ids(answers) + turn(tok, "4")
    assert (t_mixed.tool_calls, t_mixed.tool_errors, t_mixed.end) == (3, 2, "done")
    m = agent_metrics(gen.trajectories)
    assert m["rollout/tool_errors_frac"] == pytest.approx(3 / 4)


# -- (c) metrics ----------------------------------------------------------------------------------------------


def test_agent_metrics_values_by_hand():
    def traj(mask, end, turns, calls=0, errors=0, cut=0, reward=0.0):
        return Trajectory([9], list(range(len(mask))), mask, turns=turns, tool_calls=calls, tool_errors=errors,
                          tool_truncated=cut, end=end, reward=reward)  # fmt: skip

    trajs = [
        traj([True, True, False, False, False, True], "done", 2, calls=1, reward=1.0),
        traj([True, True], "done", 1, reward=0.5),
        traj([True, False, False, True, False, True], "max_turns", 3, calls=3, errors=2, cut=1, reward=-1.0),
        traj([True] * 4, "length", 1),
    ]
    m = agent_metrics(trajs)
    assert m["rollout/turns_mean"] == pytest.approx(7 / 4)
    assert m["rollout/tool_calls_mean"] == pytest.approx(4 / 4)
    assert m["rollout/tool_errors_frac"] == pytest.approx(2 / 4)
    assert m["rollout/tool_truncated_frac"] == pytest.approx(1 / 4)
    assert m["rollout/env_token_frac"] == pytest.approx(6 / 18)
    assert m["rollout/trajectory_reward_mean"] == pytest.approx(0.5 / 4)
    assert m["rollout/end_done_frac"] == pytest.approx(0.5)
    assert m["rollout/end_max_turns_frac"] == pytest.approx(0.25)
    assert m["rollout/end_length_frac"] == pytest.approx(0.25)
    assert m["rollout/end_budget_frac"] == 0.0


def test_agent_metrics_of_a_run(tok):
    call_add = turn(tok, call_text("add", a=1, b=2))
    call_fail = turn(tok, call_text("fails", x=0))
    rambling = encode(tok, "x" * 70)
    first = {0: call_add, 1: turn(tok, "3"), 2: call_fail, 3: rambling}

    def script(call, context, sample):
        return first[sample] if call == 0 else turn(tok, "3")

    engine = ScriptedEngine(tok, script, max_new_tokens=60)
    runner = tool_runner(engine, tools=[add, fails])
    ps = prompts(tok, ["1+2"], runner.renderer.tools)
    gen = runner.run(ps, 4)
    ends = [t.end for t in gen.trajectories]
    assert ends == ["done", "done", "done", "length"]
    m = agent_metrics(gen.trajectories)
    assert m["rollout/turns_mean"] == pytest.approx((2 + 1 + 2 + 1) / 4)
    assert m["rollout/tool_calls_mean"] == pytest.approx(2 / 4)
    assert m["rollout/tool_errors_frac"] == pytest.approx(1 / 2)
    add_suffix = runner.renderer.ids([tool_message("3", "add")])
    fail_text = runner.environment()._toolbox.call(
        __import__("gspo_lightning.agents").agents.ToolCall("fails", {"x": 0})
    )
    fail_suffix = runner.renderer.ids([tool_message(fail_text.text, "fails")])
    appended = len(add_suffix) + len(fail_suffix)
    total = sum(len(t.completion_ids) for t in gen.trajectories)
    assert total == len(call_add) + len(add_suffix) + 2 + 2 + len(call_fail) + len(fail_suffix) + 2 + 60
    assert m["rollout/env_token_frac"] == pytest.approx(appended / total)
    assert m["rollout/end_done_frac"] == 0.75 and m["rollout/end_length_frac"] == 0.25
