"""The trajectory contract: a prompt's ids, then everything after it, with a mask of the tokens the model sampled.

Every way into multi-turn rollouts (``data.tools``, ``data.environment``, ``data.rollout_function``) produces
:class:`Trajectory` objects; :func:`trajectories_to_generation` lays N of them out as one
:class:`~gspo_lightning.engines.base.Generation`: ``response_ids`` hold every token after the prompt (model turns
and the messages appended between them, in order), ``response_mask`` every real one, and ``loss_mask`` only the
model's (the tokens the engine sampled). The trainer forwards all of them and trains on ``loss_mask`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from gspo_lightning.engines.base import Generation, pad_left

END_REASONS = ("done", "max_turns", "budget", "length")


@dataclass
class Trajectory:
    """One trajectory, token level: what a rollout function returns (the built-in agent loop fills the rest).

    Attributes:
        prompt_ids: the prompt's ids, as the engine was given them.
        completion_ids: every id after the prompt, in order: model turns and appended messages.
        loss_mask: one bool per completion id, True where the engine sampled it (trained on), False on appended
            tool / environment tokens (context only).
        logprobs: the engine's log-prob of each completion id (ignored where ``loss_mask`` is False), or None.
        routes: (L, len(prompt_ids) + len(completion_ids), k) the experts the engine's MoE routers chose at each
            position, or None; ``route_mask`` (same length, bool) says where they are known.
        reward: the environment's (or rollout function's) return, summed over turns (``TrajectoryReward``).
        final_text: the last model turn's text, what ``data.rewards`` score as the completion (None: decoded from
            the last run of model tokens).
        turns / tool_calls / tool_errors / tool_truncated: counts for the rollout metrics.
        end: why it ended: ``done``, ``max_turns``, ``budget`` (the token budget) or ``length`` (a turn hit
            ``max_new_tokens`` without EOS).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    loss_mask: list[bool]
    logprobs: list[float] | None = None
    routes: Tensor | None = None
    route_mask: Tensor | None = None
    reward: float = 0.0
    final_text: str | None = None
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    tool_truncated: int = 0
    end: str = "done"
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if len(self.loss_mask) != n:
            raise ValueError(f"Trajectory: loss_mask has {len(self.loss_mask)} entries for {n} completion ids.")
        if self.logprobs is not None and len(self.logprobs) != n:
            raise ValueError(f"Trajectory: logprobs has {len(self.logprobs)} entries for {n} completion ids.")
        if self.end not in END_REASONS:
            raise ValueError(f"Trajectory.end must be one of {END_REASONS}, got {self.end!r}.")
        width = len(self.prompt_ids) + n
        if self.routes is not None and (self.routes.dim() != 3 or self.routes.shape[1] < width):
            raise ValueError(f"Trajectory.routes must be (L, {width}, k), got {tuple(self.routes.shape)}.")

    @property
    def truncated(self) -> bool:
        """Ended by a limit on tokens (the budget, or a turn's ``max_new_tokens``)."""
        return self.end in ("budget", "length")

    @property
    def model_tokens(self) -> int:
        return sum(self.loss_mask)


def last_model_run(trajectory: Trajectory) -> list[int]:
    """The ids of the last contiguous run of model tokens (the final turn)."""
    mask, ids = trajectory.loss_mask, trajectory.completion_ids
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[start:end]


def trajectories_to_generation(trajectories: Sequence[Trajectory], pad_id: int) -> Generation:
    """N trajectories as one :class:`Generation` (rows in order; prompts left-padded, the rest right-padded).

    ``response_mask`` covers every real token after the prompt, ``loss_mask`` the sampled ones; engine log-probs
    are 0 off the loss mask; routes (when every trajectory has them) fill ``routes``/``route_mask`` in the
    ``[prompt | response]`` columns.
    """
    prompt_ids, prompt_mask = pad_left([list(t.prompt_ids) for t in trajectories], pad_id)
    lengths = torch.tensor([len(t.completion_ids) for t in trajectories])
    width = max(int(lengths.max()) if len(trajectories) else 0, 1)
    n = len(trajectories)
    response = torch.full((n, width), pad_id, dtype=torch.long)
    loss = torch.zeros(n, width, dtype=torch.bool)
    have_logprobs = all(t.logprobs is not None for t in trajectories)
    logprobs = torch.zeros(n, width) if have_logprobs else None
    for i, t in enumerate(trajectories):  # over trajectories, on the data side
        k = len(t.completion_ids)
        response[i, :k] = torch.tensor(t.completion_ids, dtype=torch.long)
        loss[i, :k] = torch.tensor(t.loss_mask, dtype=torch.bool)
        if logprobs is not None:
            logprobs[i, :k] = torch.tensor(t.logprobs, dtype=torch.float32)
    real = torch.arange(width)[None, :] < lengths[:, None]
    if logprobs is not None:
        logprobs = logprobs.masked_fill(~loss, 0.0)
    generation = Generation(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response,
        response_mask=real,
        truncated=torch.tensor([t.truncated for t in trajectories], dtype=torch.bool),
        logprobs=logprobs,
        loss_mask=loss,
        trajectories=list(trajectories),
    )
    if n and all(t.routes is not None for t in trajectories):
        generation.routes, generation.route_mask = _layout_routes(trajectories, prompt_ids.shape[1], width)
    return generation


def _layout_routes(trajectories: Sequence[Trajectory], p: int, t: int) -> tuple[Tensor, Tensor]:
    routes, masks = [], []
    for traj in trajectories:
        a, b = len(traj.prompt_ids), len(traj.completion_ids)
        r = traj.routes[:, : a + b]
        m = traj.route_mask[: a + b] if traj.route_mask is not None else torch.ones(a + b, dtype=torch.bool)
        routes.append(F.pad(r, (0, 0, p - a, t - b)))
        masks.append(F.pad(m, (p - a, t - b)))
    return torch.stack(routes), torch.stack(masks)
