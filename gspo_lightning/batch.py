"""`RolloutBatch`: the one type that carries a rollout batch from the data side to the module.

Shapes use fixed letters: B prompts, G samples per prompt, N = B*G sequences, P the padded prompt width,
T the padded response width. Prompts are left-padded and responses right-padded, so ``input_ids`` is
``[prompt | response]`` with the response always starting at column P.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

SEQUENCE_FIELDS = ("input_ids", "attention_mask", "routing_mask", "rollout_routing_mask")  # (N, P+T)
ROUTING_FIELDS = ("routing", "rollout_routing")  # (N, L, P+T, k)


@dataclass
class RolloutBatch:
    """One rollout batch of N = B*G sequences.

    Attributes:
        input_ids: (N, P+T) int64, left-padded prompt followed by right-padded response.
        attention_mask: (N, P+T) bool, True on real prompt and response tokens.
        response_mask: (N, T) bool, True on the sampled tokens that are trained on: every real response token, or in
            a multi-turn trajectory the model's turns only (its appended tool / environment tokens are real,
            ``attention_mask`` is True on them, but they are context, never trained on).
        rewards: (N,) float32, the scalar reward of each sequence, as the reward functions scored it.
        penalised_rewards: (N,) float32, ``rewards`` less the KL penalty when the KL term is applied in the
            reward (``model.loss.kl_in_reward``), or None. Advantages read :attr:`advantage_rewards`.
        group_ids: (N,) int64; the G samples of one prompt share an id.
        old_logprobs: (N, T) log pi_old of the sampled tokens (behaviour policy), or None until computed.
        ref_logprobs: (N, T) log pi_ref of the sampled tokens, or None when no reference model is used.
        rollout_logprobs: (N, T) log-probs reported by the rollout engine, or None if it gave none.
        advantages: (N,) or (N, T), filled in by the module from the advantage component.
        truncated: (N,) bool, True where generation stopped at the length limit rather than at EOS.
        reward_terms: name -> (N,) per-reward scores before weighting, for logging.
        prompts: N prompt texts (repeated G times), for sample logging and rewards.
        completions: N decoded responses.
        answers: N reference answers (None where the task has none).
        prompt_index: (N,) int64, position of each prompt in its dataset (for resuming and debugging).
        metrics: scalar statistics of how the batch was made (``rollout/*``, ``time/*``), for logging.
        routing: (N, L, P+T, k) the experts the update's forwards replay (Routing Replay: pi_old's, recorded in
            the pre-update pass; Rollout Routing Replay: the engine's) or compare with (``moe/routing_change_frac``),
            or None.
        routing_mask: (N, P+T) bool, the positions ``routing`` covers (others route naturally), or None: all.
        rollout_routing: (N, L, P+T, k) the experts the rollout engine chose (``Generation.routes``), or None.
        rollout_routing_mask: (N, P+T) bool, the positions the engine reported a route for, or None.
        is_weights: (N, T) detached weights multiplying each token's policy loss, set before the update: the
            rollout/trainer mismatch importance weights pi_old / pi_rollout (``components.mismatch``) times the
            pre-update token masks' (``components.masks``), or None.
        token_kl_coef: (N, T) the pre-update token masks' coefficients of a ``|lp - old|`` penalty (KL-Cov), or None.
        engine_is_policy: the engine sampled with the trainer's own module (``RolloutEngine.generates_with_policy``):
            the rollout/trainer log-prob gap is rounding, not logged.
        policy_version: (N,) int64, the policy version that sampled each sequence (rollout batches trained on before
            it) under asynchronous rollouts (``data.max_staleness``), or None: the current one.
        staleness: (N,) int64, updates between the weights that sampled each sequence and those it is trained from
            (at most ``data.max_staleness``), or None: 0.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    rewards: Tensor
    group_ids: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    rollout_logprobs: Tensor | None = None
    advantages: Tensor | None = None
    truncated: Tensor | None = None
    reward_terms: dict[str, Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    answers: list[str | None] = field(default_factory=list)
    prompt_index: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    routing: Tensor | None = None
    routing_mask: Tensor | None = None
    rollout_routing: Tensor | None = None
    rollout_routing_mask: Tensor | None = None
    is_weights: Tensor | None = None
    token_kl_coef: Tensor | None = None
    penalised_rewards: Tensor | None = None
    engine_is_policy: bool = False
    policy_version: Tensor | None = None
    staleness: Tensor | None = None

    def __post_init__(self) -> None:
        n, t = self.response_mask.shape
        if self.input_ids.shape[0] != n or self.input_ids.shape[1] < t:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} must be (N, P+T) for response_mask {(n, t)}.")
        for name in ("rewards", "group_ids", "penalised_rewards", "policy_version", "staleness"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape (N,) = ({n},), got {tuple(getattr(self, name).shape)}.")
        for name in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
            value = getattr(self, name)
            if value is not None and value.shape != (n, t):
                raise ValueError(f"{name} must have shape (N, T) = {(n, t)}, got {tuple(value.shape)}.")
        width = self.input_ids.shape[1]
        for name in SEQUENCE_FIELDS[2:] + ROUTING_FIELDS:
            value = getattr(self, name)
            columns = 1 if name in SEQUENCE_FIELDS else 2
            if value is not None and (value.shape[0] != n or value.shape[columns] != width):
                raise ValueError(f"{name} must cover the N={n} rows and P+T={width} columns, got {tuple(value.shape)}.")

    @property
    def advantage_rewards(self) -> Tensor:
        """(N,) the rewards advantages are computed from: the penalised ones when a KL penalty applies."""
        return self.rewards if self.penalised_rewards is None else self.penalised_rewards

    @property
    def is_stale(self) -> bool:
        """Whether any sequence was sampled by older weights than those it is trained from (asynchronous rollouts)."""
        return self.staleness is not None and bool(self.staleness.any())

    @property
    def num_sequences(self) -> int:
        """N."""
        return self.response_mask.shape[0]

    @property
    def prompt_width(self) -> int:
        """P, the column where responses start in ``input_ids``."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_ids(self) -> Tensor:
        """(N, T) the sampled response tokens."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_spans(self) -> Tensor:
        """(N,) columns after the prompt up to each sequence's last trained token: its response length, or for a
        multi-turn trajectory its model and appended tokens up to the last model token (what a forward computes)."""
        t = self.response_mask.shape[1]
        last = torch.where(self.response_mask, torch.arange(1, t + 1, device=self.response_mask.device), 0)
        return last.max(-1).values if t else self.response_mask.sum(-1)

    @property
    def response_lengths(self) -> Tensor:
        """(N,) number of real response tokens per sequence."""
        return self.response_mask.sum(-1)

    def __len__(self) -> int:
        return self.num_sequences

    def to(self, device: torch.device | str) -> RolloutBatch:
        """A copy with every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def select(self, index: Tensor | Sequence[int]) -> RolloutBatch:
        """The sub-batch of sequences ``index`` (used for mini- and micro-batches)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        idx_list = idx.tolist()
        return self._map(lambda t: t[idx.to(t.device)], lambda seq: [seq[i] for i in idx_list])

    def trimmed(self) -> RolloutBatch:
        """A copy without the padding columns every sequence shares: leading prompt columns that are padding in
        every row and trailing response columns past every response. Values are unchanged (positions come from
        the attention mask), but a micro-batch of short sequences no longer computes at the batch's widths."""
        p, t = self.prompt_width, self.response_mask.shape[1]
        real_prompt = self.attention_mask[:, :p].any(0)
        start = int(real_prompt.int().argmax()) if bool(real_prompt.any()) else p
        real_response = self.response_mask.any(0)
        width = t - int(real_response.flip(0).int().argmax()) if bool(real_response.any()) else 1
        if start == 0 and width == t:
            return self
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                pass
            elif f.name in SEQUENCE_FIELDS:
                value = value[:, start : p + width]
            elif f.name in ROUTING_FIELDS:
                value = value[:, :, start : p + width]
            elif isinstance(value, Tensor) and value.dim() >= 2 and value.shape[1] == t:
                value = value[:, :width]  # (N, T) response-aligned tensors
            values[f.name] = value
        return RolloutBatch(**values)

    def _map(self, fn_tensor, fn_list=None) -> RolloutBatch:
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = fn_tensor(value)
            elif isinstance(value, dict):
                value = {k: fn_tensor(v) if isinstance(v, Tensor) else v for k, v in value.items()}
            elif isinstance(value, list) and fn_list is not None and value:
                value = fn_list(value)
            values[f.name] = value
        return RolloutBatch(**values)
