"""A scripted rollout engine and small helpers for the agent-loop tests (the demo's chat tokenizer, no model)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gspo_lightning.agents.environment import Environment, ToolEnvironment
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.parsers import HermesToolParser
from gspo_lightning.agents.runner import AgentRunner
from gspo_lightning.agents.tools import CallTimer, Toolbox
from gspo_lightning.data.chat import MessageRenderer
from gspo_lightning.data.encode import EncodedPrompt, encode_prompts
from gspo_lightning.data.prompts import PromptRecord
from gspo_lightning.demo.tokenizer import build_chat_tokenizer
from gspo_lightning.engines.base import Generation, RolloutEngine, SamplingConfig, pad_left

# script(call, context, sample) -> the ids the "model" emits for that row (EOS included when it stops)
Script = Callable[[int, list[int], int], Sequence[int]]

LAYERS, TOP_K = 2, 2


def route_value(call: int, position: int) -> int:
    """What the scripted engine reports as the expert of ``position`` in its ``call``-th generate."""
    return call * 1000 + position


def made_up_logprob(call: int, row: int, j: int) -> float:
    """The scripted engine's log-prob of the j-th token it sampled for ``row`` in its ``call``-th generate."""
    return -(0.1 * (call + 1) + 0.01 * row + 0.0001 * (j + 1))


class ScriptedEngine(RolloutEngine):
    """An engine whose "model" is a script: deterministic responses, made-up log-probs, optional routes.

    Every ``generate`` call is recorded in :attr:`calls` (prompt ids, samples, limits, what was returned).
    ``honour_limits=False`` ignores the per-row ``max_new_tokens`` (an engine that overshoots a budget).
    """

    generates_with_policy = False

    def __init__(
        self, tokenizer, script: Script, max_new_tokens: int = 64, routes: bool = False, honour_limits: bool = True
    ) -> None:
        super().__init__()
        self.configure(SamplingConfig(max_new_tokens=max_new_tokens), tokenizer)
        self.script = script
        self.honour_limits = honour_limits
        self.calls: list[dict[str, Any]] = []
        self._bound = False
        if routes:
            self.request_routes()

    def bind(self, policy) -> None:
        self._bound = True

    @property
    def is_bound(self) -> bool:
        return self._bound

    def generate(self, prompt_ids, num_samples, greedy=False, max_new_tokens=None) -> Generation:
        call = len(self.calls)
        eos = self.tokenizer.eos_token_id
        contexts = [list(p) for p in prompt_ids for _ in range(num_samples)]
        limits = [self.sampling.max_new_tokens] * len(contexts)
        if max_new_tokens is not None:
            assert len(max_new_tokens) == len(prompt_ids), "max_new_tokens must hold one limit per prompt"
            if self.honour_limits:
                limits = [min(m, self.sampling.max_new_tokens) for m in max_new_tokens for _ in range(num_samples)]
        responses, truncated = [], []
        for r, ctx in enumerate(contexts):
            ids = list(self.script(call, ctx, r % num_samples))
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
            kept = ids[: limits[r]]
            responses.append(kept)
            truncated.append(eos not in kept and len(kept) >= limits[r])
        self.calls.append(
            {
                "prompt_ids": copy.deepcopy([list(p) for p in prompt_ids]),
                "num_samples": num_samples,
                "greedy": greedy,
                "max_new_tokens": None if max_new_tokens is None else list(max_new_tokens),
                "responses": copy.deepcopy(responses),
            }
        )
        pad = self.tokenizer.pad_token_id
        p_ids, p_mask = pad_left(contexts, pad)
        width = max(max((len(x) for x in responses), default=0), 1)
        r_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
        r_mask = torch.zeros(len(contexts), width, dtype=torch.bool)
        logprobs = torch.zeros(len(contexts), width)
        for r, ids in enumerate(responses):
            r_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            r_mask[r, : len(ids)] = True
            logprobs[r, : len(ids)] = torch.tensor([made_up_logprob(call, r, j) for j in range(len(ids))])
        out = Generation(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            response_ids=r_ids,
            response_mask=r_mask,
            truncated=torch.tensor(truncated, dtype=torch.bool),
            logprobs=logprobs,
        )
        if self.return_routes:
            out.routes, out.route_mask = self._routes(call, contexts, responses, p_ids.shape[1], width)
        return out

    @staticmethod
    def _routes(call, contexts, responses, p, t):
        """Each real column's route encodes (call, position in the row's own sequence); the last sampled token
        was never fed back, so it has none (as a real engine)."""
        n = len(contexts)
        routes = torch.full((n, LAYERS, p + t, TOP_K), -1, dtype=torch.long)
        mask = torch.zeros(n, p + t, dtype=torch.bool)
        for r, (ctx, ids) in enumerate(zip(contexts, responses, strict=True)):
            pad = p - len(ctx)
            run = len(ctx) + max(len(ids) - 1, 0)  # positions the engine ran a forward on
            for q in range(run):
                routes[r, :, pad + q, :] = route_value(call, q)
                mask[r, pad + q] = True
        return routes, mask


# -- the demo's tool-capable chat tokenizer, a tool, prompts -------------------------------------------------


def chat_tokenizer():
    return build_chat_tokenizer()


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer.
        b: the second integer.
    """
    return a + b


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def turn(tokenizer, text: str, eos: bool = True) -> list[int]:
    """The ids of a model turn ``text`` (EOS appended)."""
    return encode(tokenizer, text) + ([tokenizer.eos_token_id] if eos else [])


def call_text(name: str, **arguments) -> str:
    import json

    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def prompts(tokenizer, texts: Sequence[str], schemas: list[dict] | None, answers=None) -> list[EncodedPrompt]:
    answers = answers or [None] * len(texts)
    records = [PromptRecord(text=t, answer=a, index=i) for i, (t, a) in enumerate(zip(texts, answers, strict=True))]
    encoded, dropped = encode_prompts(records, tokenizer, max_prompt_length=512, tools=schemas)
    assert dropped == 0
    return encoded


def tool_runner(
    engine: ScriptedEngine,
    tools: Sequence[Callable] = (add,),
    environment: Callable[[], Environment] | None = None,
    **options,
) -> AgentRunner:
    """An AgentRunner over ``tools`` (a ToolEnvironment) or ``environment``, as build_sampler sets one up."""
    agent = AgentOptions(**options)
    timer = CallTimer(agent.tool_timeout_s)
    if environment is None:
        box = Toolbox(list(tools), timer)
        schemas = box.schemas

        def environment() -> Environment:
            return ToolEnvironment(box)
    else:
        schemas = environment().toolbox(timer).schemas
    renderer = MessageRenderer(engine.tokenizer, schemas)
    return AgentRunner(engine, engine.tokenizer, environment, HermesToolParser(), agent, renderer, timer=timer)


def schemas_of(runner: AgentRunner) -> list[dict]:
    return runner.renderer.tools
