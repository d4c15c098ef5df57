"""Environments, tools and a rollout function for the tests, importable by path from the CLI (tests/ is on sys.path)."""

from __future__ import annotations

from gspo_lightning.agents import Environment, Step, Trajectory


class ThreeTurns(Environment):
    """Answers every model turn with a user message until the model has spoken three times (no tools)."""

    def step(self, turn):
        if turn.index >= 2:
            return Step(reward=1.0, done=True)
        return Step(messages=[{"role": "user", "content": f"again {turn.index}"}], reward=0.5)


def untyped(a, b):
    """A tool without type hints."""
    return a


def one_turn(prompts, num_samples, engine, tokenizer, greedy):
    """One engine call, each completion a one-turn trajectory rewarded by its length."""
    out = engine.generate([p.input_ids for p in prompts], num_samples, greedy=greedy)
    trajectories = []
    for i in range(out.response_ids.shape[0]):
        ids = out.response_ids[i][out.response_mask[i]].tolist()
        lps = out.logprobs[i][: len(ids)].tolist() if out.logprobs is not None else None
        prompt = out.prompt_ids[i][out.prompt_mask[i]].tolist()
        trajectories.append(
            Trajectory(
                prompt_ids=prompt, completion_ids=ids, loss_mask=[True] * len(ids), logprobs=lps, reward=len(ids)
            )
        )
    return trajectories
