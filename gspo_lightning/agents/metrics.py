"""``rollout/*`` statistics of multi-turn trajectories: turns, tool calls and errors, appended tokens, endings."""

from __future__ import annotations

from collections.abc import Sequence

from gspo_lightning.agents.trajectory import END_REASONS, Trajectory


def agent_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Means over the trajectories, shares of tool calls and of tokens, and the share of each end reason.

    ``rollout/tool_errors_frac`` is failed calls (unknown tool, bad arguments, a raise, a timeout, a malformed
    call) over all calls; ``rollout/env_token_frac`` is appended tokens over all tokens after the prompts.
    """
    n = max(len(trajectories), 1)
    calls = sum(t.tool_calls for t in trajectories)
    tokens = sum(len(t.completion_ids) for t in trajectories)
    model = sum(t.model_tokens for t in trajectories)
    metrics = {
        "rollout/turns_mean": sum(t.turns for t in trajectories) / n,
        "rollout/tool_calls_mean": calls / n,
        "rollout/tool_errors_frac": sum(t.tool_errors for t in trajectories) / max(calls, 1),
        "rollout/tool_truncated_frac": sum(t.tool_truncated for t in trajectories) / max(calls, 1),
        "rollout/env_token_frac": (tokens - model) / max(tokens, 1),
        "rollout/trajectory_reward_mean": sum(t.reward for t in trajectories) / n,
    }
    for reason in END_REASONS:
        metrics[f"rollout/end_{reason}_frac"] = sum(t.end == reason for t in trajectories) / n
    return metrics
