"""How a rollout batch's sequences are produced: one engine call (single turn), the agent loop, or the user's own.

The data module picks one :class:`Sampler` at set-up and the collector and the held-out evaluation both call it:
``sample(prompts, num_samples, greedy) -> Generation``. Multi-turn samplers return a ``Generation`` whose
``trajectories`` and ``loss_mask`` are set (:mod:`gspo_lightning.agents.trajectory`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from gspo_lightning.agents.runner import AgentRunner
from gspo_lightning.agents.trajectory import Trajectory, trajectories_to_generation
from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.engines.base import Generation, RolloutEngine


class Sampler:
    """Single-turn sampling: G completions per prompt from one engine call."""

    def __init__(self, engine: RolloutEngine) -> None:
        self.engine = engine

    def sample(self, prompts: Sequence[EncodedPrompt], num_samples: int, greedy: bool = False) -> Generation:
        return self.engine.generate([list(p.input_ids) for p in prompts], num_samples, greedy=greedy)


class AgentSampler(Sampler):
    """Multi-turn sampling through the built-in loop (``data.tools`` / ``data.environment``)."""

    def __init__(self, runner: AgentRunner) -> None:
        super().__init__(runner.engine)
        self.runner = runner

    def sample(self, prompts: Sequence[EncodedPrompt], num_samples: int, greedy: bool = False) -> Generation:
        return self.runner.run(prompts, num_samples, greedy=greedy)


class FunctionSampler(Sampler):
    """A rollout function of the user's: ``fn(prompts, num_samples, engine, tokenizer, greedy) -> list[Trajectory]``.

    It receives the encoded prompts (each with its record: text, answer, columns), G, the configured and bound
    engine, the tokenizer and whether to decode greedily (held-out evaluation), and returns ``len(prompts) * G``
    trajectories, the G of a prompt adjacent.
    """

    def __init__(self, fn: Callable[..., Sequence[Trajectory]], engine: RolloutEngine, tokenizer: Any) -> None:
        super().__init__(engine)
        self.fn, self.tokenizer = fn, tokenizer

    def sample(self, prompts: Sequence[EncodedPrompt], num_samples: int, greedy: bool = False) -> Generation:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        out = list(
            self.fn(prompts=list(prompts), num_samples=num_samples, engine=self.engine, tokenizer=self.tokenizer,
                    greedy=greedy)
        )  # fmt: skip
        expected = len(prompts) * num_samples
        if len(out) != expected or not all(isinstance(t, Trajectory) for t in out):
            kinds = sorted({type(t).__name__ for t in out})
            raise ValueError(
                f"data.rollout_function {name} returned {len(out)} items of {kinds} for {len(prompts)} prompts x"
                f" {num_samples} samples: return {expected} gspo_lightning.agents.Trajectory objects, the"
                " samples of a prompt adjacent."
            )
        return trajectories_to_generation(out, self.tokenizer.pad_token_id)
