"""The multi-turn loop: G x B trajectories advanced together, turn by turn, token-in, token-out.

Each turn, every active trajectory's ids so far go to the engine in one ``generate`` call (one sample each;
the first turn samples G per prompt); the sampled ids are appended exactly as returned, with the engine's
log-probs and (for Rollout Routing Replay) the experts it chose; the environment answers each turn; the ids of
its messages (only they are tokenised, :class:`~gspo_lightning.data.chat.MessageRenderer`) are appended; the
trajectories that ended drop out. Routes for a position are those of the first engine forward that ran it: a
sampled token's from the turn that sampled it, an appended message's from the next turn's prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gspo_lightning.agents.environment import Environment, Turn
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.parsers import ToolCallParser
from gspo_lightning.agents.tools import CallTimer
from gspo_lightning.agents.trajectory import Trajectory, trajectories_to_generation
from gspo_lightning.data.chat import MessageRenderer
from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.engines.base import Generation, RolloutEngine


@dataclass
class _State:
    """A trajectory being built."""

    prompt: list[int]
    env: Environment
    ids: list[int] = field(default_factory=list)  # after the prompt
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    routes: Tensor | None = None  # (L, positions so far, k)
    route_mask: Tensor | None = None
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_truncated: int = 0
    final_text: str = ""
    end: str = "done"
    messages: list[dict] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.prompt + self.ids

    def extend(self, ids: list[int], logprobs: list[float], sampled: bool) -> None:
        self.ids += ids
        self.mask += [sampled] * len(ids)
        self.logprobs += logprobs

    def add_routes(self, routes: Tensor, mask: Tensor, offset: int, length: int) -> None:
        """Keep the routes of positions no earlier call ran: ``routes[:, offset + q]`` is position q's."""
        new, new_mask = routes[:, offset : offset + length], mask[offset : offset + length]
        if self.routes is None:
            self.routes, self.route_mask = new.clone(), new_mask.clone()
            return
        known = self.routes.shape[1]
        fill = new_mask[:known] & ~self.route_mask
        head = torch.where(fill[None, :, None], new[:, :known], self.routes)
        self.routes = torch.cat([head, new[:, known:]], 1)
        self.route_mask = torch.cat([self.route_mask | new_mask[:known], new_mask[known:]])

    def finish(self) -> Trajectory:
        return Trajectory(
            prompt_ids=self.prompt,
            completion_ids=self.ids,
            loss_mask=self.mask,
            logprobs=self.logprobs,
            routes=self.routes,
            route_mask=self.route_mask,
            reward=self.reward,
            final_text=self.final_text,
            turns=self.turns,
            tool_calls=self.tool_calls,
            tool_errors=self.tool_errors,
            tool_truncated=self.tool_truncated,
            end=self.end,
            messages=self.messages,
        )


class AgentRunner:
    """Runs the turn loop for a batch of prompts (see the module docstring).

    Args:
        engine: the rollout engine (configured and bound).
        tokenizer: the policy's tokenizer.
        environment: builds one environment per trajectory.
        parser: finds the tool calls in a model turn.
        options: the limits (``data.agent``).
        context: the model's context length, the budget when ``options.max_tokens`` is None.
        timer: runs tool calls with ``options.tool_timeout_s``.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        environment: Callable[[], Environment],
        parser: ToolCallParser,
        options: AgentOptions,
        renderer: MessageRenderer,
        context: int | None = None,
        timer: CallTimer | None = None,
    ) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.environment, self.parser, self.options = environment, parser, options
        self.renderer = renderer
        self.budget = options.max_tokens if options.max_tokens is not None else context
        self.timer = timer or CallTimer(options.tool_timeout_s)

    def new_environment(self, prompt: EncodedPrompt) -> Environment:
        env = self.environment()
        env._timer = self.timer
        record = prompt.record
        env.reset(record.text, record.answer, **record.extras)
        return env

    def run(self, prompts: Sequence[EncodedPrompt], num_samples: int, greedy: bool = False) -> Generation:
        """``num_samples`` trajectories per prompt (samples of a prompt adjacent), as a :class:`Generation`."""
        states = [
            _State(prompt=list(p.input_ids), env=self.new_environment(p)) for p in prompts for _ in range(num_samples)
        ]
        active = list(range(len(states)))
        turn = 0
        while active:
            if turn == 0:
                contexts, samples = [list(p.input_ids) for p in prompts], num_samples
            else:
                contexts, samples = [states[i].context for i in active], 1
            out = self.engine.generate(contexts, samples, greedy=greedy, **self._limits(contexts))
            active = self._advance(states, active, out, turn)
            turn += 1
        pad = self.tokenizer.pad_token_id
        return trajectories_to_generation([s.finish() for s in states], pad)

    def _limits(self, contexts: list[list[int]]) -> dict[str, list[int]]:
        """``max_new_tokens`` per context when the token budget leaves some less than a whole turn."""
        if self.budget is None:
            return {}
        rooms = [self.budget - len(c) for c in contexts]
        return {"max_new_tokens": rooms} if min(rooms) < self.engine.sampling.max_new_tokens else {}

    def _advance(self, states: list[_State], active: list[int], out: Generation, turn: int) -> list[int]:
        """Append one turn to each active trajectory; the indices still active after it."""
        width = out.prompt_ids.shape[1]
        sampled = [out.response_ids[r][out.response_mask[r]].tolist() for r in range(len(active))]
        texts = self.tokenizer.batch_decode(sampled, skip_special_tokens=True)
        still = []
        for r, i in enumerate(active):  # over trajectories, on the data side
            s = states[i]
            ids = sampled[r]
            lps = out.logprobs[r][: len(ids)].tolist() if out.logprobs is not None else [0.0] * len(ids)
            start = len(s.prompt) + len(s.ids)
            if out.routes is not None and out.route_mask is not None:
                s.add_routes(out.routes[r], out.route_mask[r], width - start, start + len(ids))
            room = None if self.budget is None else self.budget - start
            end = None
            if room is not None and len(ids) > room:
                room = max(room, 0)  # a prompt longer than the budget keeps no token (not ids[:-k])
                ids, lps, end = ids[:room], lps[:room], "budget"
                texts[r] = self.tokenizer.decode(ids, skip_special_tokens=True)
            s.extend(ids, lps, sampled=True)
            s.turns += 1
            s.final_text = texts[r]
            s.messages.append({"role": "assistant", "content": texts[r]})
            if end is None and bool(out.truncated[r]):
                end = "budget" if room is not None and len(ids) >= room else "length"
            if end is None:
                end = self._respond(s, texts[r], turn)
            if end is None:
                still.append(i)
            else:
                s.end = end
        return still

    def _respond(self, s: _State, text: str, turn: int) -> str | None:
        """The environment's answer to a turn, appended; why the trajectory ends, or None when it goes on."""
        step = s.env.step(Turn(text=text, parsed=self.parser.parse(text), index=turn))
        s.reward += float(step.reward)
        s.tool_calls += step.tool_calls
        s.tool_errors += step.tool_errors
        if step.done or not step.messages:
            return "done"
        if s.turns >= self.options.max_turns:
            return "max_turns"
        messages = [self._capped(m, s) for m in step.messages]
        suffix = self.renderer.ids(messages)
        if self.budget is not None and len(s.prompt) + len(s.ids) + len(suffix) >= self.budget:
            return "budget"
        s.extend(suffix, [0.0] * len(suffix), sampled=False)
        s.messages += messages
        return None

    def _capped(self, message: dict, s: _State) -> dict:
        """``message`` with its content cut to ``max_tool_response_tokens`` tokens (counted when cut)."""
        content = message.get("content")
        if not isinstance(content, str):
            return message
        cap = self.options.max_tool_response_tokens
        ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
        if len(ids) <= cap:
            return message
        s.tool_truncated += 1
        return {**message, "content": self.tokenizer.decode(ids[:cap]) + " [truncated]"}
