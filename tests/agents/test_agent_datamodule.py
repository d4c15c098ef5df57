"""The data module with data.tools / data.rollout_function: set-up refusals, and the rollout batch it assembles."""

import re
from types import SimpleNamespace

import pytest
from scripted import ScriptedEngine, add, call_text, encode, turn
from torch import nn

from gspo_lightning.agents import Trajectory
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.parsers import ParsedTurn, ToolCallParser
from gspo_lightning.agents.sampler import AgentSampler, FunctionSampler
from gspo_lightning.agents.setup import resolve_parser
from gspo_lightning.data import AdditionTask
from gspo_lightning.demo.tokenizer import build_char_tokenizer, build_chat_tokenizer
from gspo_lightning.engines import SamplingConfig
from gspo_lightning.rollout import PolicyLink, RolloutDataModule, RolloutOptions


class NoCalls(ToolCallParser):
    """A parser that never finds a call (for the import-path lookup)."""

    def parse(self, text: str) -> ParsedTurn:
        return ParsedTurn(content=text)


def _policy(context: int = 512) -> nn.Module:
    policy = nn.Linear(1, 1)
    policy.config = SimpleNamespace(max_position_embeddings=context)
    return policy


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_tok")
    build_chat_tokenizer(save_dir=path)
    return str(path)


def _datamodule(tok_dir, engine, **kwargs):
    dm = RolloutDataModule(
        prompts=AdditionTask(num_train=8, num_val=2),
        tokenizer=tok_dir,
        engine=engine,
        sampling=SamplingConfig(max_new_tokens=64),
        rollout=RolloutOptions(prompts_per_step=2, num_samples=2),
        **kwargs,
    )
    dm.setup("fit")
    return dm


def _adding_script(tok):
    """Sample 0 calls add on the prompt's numbers then answers the result; sample 1 answers 0 at once."""

    def script(call, context, sample):
        text = tok.decode(context, skip_special_tokens=True)
        if call == 0:
            a, b = re.findall(r"(\d+)\+(\d+)=", text)[-1]
            return turn(tok, call_text("add", a=int(a), b=int(b))) if sample == 0 else turn(tok, "0")
        return turn(tok, re.findall(r"<tool_response>(\d+)</tool_response>", text)[-1])

    return script


def test_tools_rollout_batch_trains_on_model_tokens_only(tok_dir):
    tok = build_chat_tokenizer()
    engine = ScriptedEngine(tok, _adding_script(tok))
    dm = _datamodule(tok_dir, engine, tools=[add])
    assert isinstance(dm.sampler, AgentSampler)
    assert dm._train[0].input_ids[: len(encode(tok, "<tools>add</tools>"))] == encode(tok, "<tools>add</tools>")
    dm.connect(PolicyLink(_policy()))
    batch = dm.next_rollout()

    p = batch.prompt_width
    real = batch.attention_mask[:, p:]
    tool = real & ~batch.response_mask
    assert tool[0::2].any(1).all() and not tool[1::2].any()  # the calling samples carry tool tokens
    assert (batch.rollout_logprobs[tool] == 0).all() and (batch.rollout_logprobs[batch.response_mask] < 0).all()
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]  # the final turn is what ExactMatch scores
    assert batch.completions[0].startswith("<tool_call>") and "<tool_response>" in batch.completions[0]
    m = batch.metrics
    assert m["rollout/turns_mean"] == pytest.approx(1.5) and m["rollout/tool_calls_mean"] == pytest.approx(0.5)
    assert m["rollout/end_done_frac"] == 1.0 and m["rollout/env_token_frac"] > 0
    ids = batch.input_ids[:, p:]
    for i in range(0, 4, 2):  # the tool tokens are the rendered tool message (answer in it)
        answer = batch.answers[i]
        segment = ids[i][tool[i]].tolist()
        assert segment == encode(tok, f"<|user|><tool_response>{answer}</tool_response><eos><|assistant|>")


def test_rollout_function_returns_trajectories(tok_dir):
    tok = build_chat_tokenizer()
    seen = {}

    def rollout(prompts, num_samples, engine, tokenizer, greedy):
        seen.update(n=len(prompts), g=num_samples, greedy=greedy, engine=engine)
        out = []
        for prompt in prompts:
            for _ in range(num_samples):
                answer = [*encode(tokenizer, prompt.record.answer), tokenizer.eos_token_id]
                ids = [5, 6, tokenizer.eos_token_id, 7, 8, *answer]
                mask = [True, True, True, False, False] + [True] * len(answer)
                out.append(Trajectory(list(prompt.input_ids), ids, mask, logprobs=[-0.5] * len(ids), reward=2.0))
        return out

    engine = ScriptedEngine(tok, lambda *a: [tok.eos_token_id])
    dm = _datamodule(tok_dir, engine, rollout_function=rollout)
    assert isinstance(dm.sampler, FunctionSampler)
    dm.connect(PolicyLink(_policy()))
    batch = dm.next_rollout()
    assert seen["n"] == 2 and seen["g"] == 2 and seen["greedy"] is False and seen["engine"] is engine
    assert batch.rewards.tolist() == [1.0] * 4  # ExactMatch on the last run of model tokens
    assert batch.response_mask.sum(1).tolist() == [3 + len(a) + 1 for a in batch.answers]
    assert (batch.rollout_logprobs[~batch.response_mask] == 0).all()


def test_rollout_function_returning_the_wrong_count_is_refused(tok_dir):
    tok = build_chat_tokenizer()
    engine = ScriptedEngine(tok, lambda *a: [tok.eos_token_id])

    def short(prompts, num_samples, engine, tokenizer, greedy):
        return [Trajectory([1], [2], [True])]

    dm = _datamodule(tok_dir, engine, rollout_function=short)
    dm.connect(PolicyLink(_policy()))
    with pytest.raises(ValueError, match=r"returned 1 items .* return 4 gspo_lightning\.agents\.Trajectory"):
        dm.next_rollout()


def test_two_ways_into_multi_turn_are_refused():
    with pytest.raises(ValueError, match="pick one way"):
        RolloutDataModule(tools=[add], rollout_function=lambda **k: [])


def test_tools_with_a_tokenizer_without_chat_template_are_refused(tmp_path):
    build_char_tokenizer(save_dir=tmp_path)
    tok = build_chat_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        _datamodule(str(tmp_path), ScriptedEngine(tok, lambda *a: []), tools=[add])


def test_agent_budget_beyond_the_context_is_refused(tok_dir):
    tok = build_chat_tokenizer()
    dm = _datamodule(tok_dir, ScriptedEngine(tok, lambda *a: []), tools=[add], agent=AgentOptions(max_tokens=600))
    with pytest.raises(ValueError, match="max_tokens=600 exceeds"):
        dm.connect(PolicyLink(_policy(512)))


def test_resolve_parser():
    assert type(resolve_parser("HermesToolParser")).__name__ == "HermesToolParser"
    assert isinstance(resolve_parser(f"{__name__}.NoCalls"), NoCalls)
    for bad in ("Nope", "gspo_lightning.agents.Trajectory", "no.such.module.Parser"):
        with pytest.raises(ValueError, match="not a tool-call parser"):
            resolve_parser(bad)


@pytest.mark.parametrize(
    "kwargs", [{"max_turns": 0}, {"max_tokens": 1}, {"max_tool_response_tokens": 0}, {"tool_timeout_s": 0}]
)
def test_agent_options_are_checked(kwargs):
    with pytest.raises(ValueError, match="data.agent"):
        AgentOptions(**kwargs)


def test_runner_budget_defaults_to_the_context(tok_dir):
    tok = build_chat_tokenizer()
    dm = _datamodule(tok_dir, ScriptedEngine(tok, lambda *a: []), tools=[add])
    dm.connect(PolicyLink(_policy(300)))
    assert dm.sampler.runner.budget == 300
