"""The rollout-engine interface: prompts in, G sampled completions per prompt out, new weights in.

An engine is owned by the data side (:class:`~gspo_lightning.data.RolloutDataModule`). The training module
hands it the policy once (``bind``) and after each update that changed the weights (``sync_weights``);
nothing else flows back from training to generation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gspo_lightning.registry import Registry


@dataclass
class SamplingConfig:
    """Sampling settings shared by every engine (and, for the temperature, by the trainer's log-probs).

    Attributes:
        temperature: softmax temperature; the trainer divides its logits by the same value so that its
            log-probs are those of the distribution that was sampled.
        top_p: nucleus sampling mass (1.0 disables it). Training rollouts refuse other values: see
            :meth:`RolloutEngine.configure`.
        top_k: keep the k most likely tokens (0 disables it); refused for training rollouts likewise.
        max_new_tokens: generation limit T_max; responses that reach it are "truncated".
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")


@dataclass
class Generation:
    """What an engine returns for N = len(prompts) * num_samples sequences, samples of a prompt adjacent.

    Attributes:
        prompt_ids: (N, P) left-padded prompt tokens.
        prompt_mask: (N, P) bool, True on real prompt tokens.
        response_ids: (N, T) right-padded response tokens (EOS included when generated).
        response_mask: (N, T) bool, True on generated tokens up to and including EOS.
        truncated: (N,) bool, True where the limit was hit before EOS (finish reason "length").
        logprobs: (N, T) the engine's log-probs of the sampled tokens, or None if it does not report them.
        routes: (N, L, P+T, k) the experts the engine's L MoE routers chose at every column of
            ``[prompt_ids | response_ids]`` (uint8, int16 past 256 experts), only when routes were requested
            (:meth:`RolloutEngine.request_routes`) and the rollout is sampled (greedy evaluation may skip
            them); else None. Rollout Routing Replay (R3) forces them in the trainer's forwards.
        route_mask: (N, P+T) bool, True where ``routes`` holds what the engine ran: real prompt tokens and every
            response token the engine fed back, so all but possibly the last (nothing reads the last one's
            route: the log-prob of response token j comes from column P-1+j).
        loss_mask: (N, T) bool, True on the tokens the engine sampled, for multi-turn trajectories whose responses
            also hold appended tool / environment tokens (``response_mask`` covers both); None: ``response_mask``.
        trajectories: the :class:`~gspo_lightning.agents.trajectory.Trajectory` of each row (multi-turn), or None.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    truncated: Tensor
    logprobs: Tensor | None = None
    routes: Tensor | None = None
    route_mask: Tensor | None = None
    loss_mask: Tensor | None = None
    trajectories: list | None = None

    @property
    def sampled_mask(self) -> Tensor:
        """(N, T) the tokens the engine sampled (what is trained on)."""
        return self.response_mask if self.loss_mask is None else self.loss_mask


class RolloutEngine(ABC):
    """Base class of rollout engines.

    Attributes:
        generates_with_policy: the engine samples from the trainer's own module (its log-probs are the trainer's
            up to kernel rounding, so there is no rollout/trainer mismatch to log); False for engines holding
            weights of their own.
    """

    generates_with_policy = False

    def __init__(self) -> None:
        self.sampling = SamplingConfig()
        self.return_routes = False

    def request_routes(self) -> None:
        """Report each sequence's MoE routes in every later :class:`Generation` (``routes``, ``route_mask``).

        Called by the data module before the engine is bound when the trainer asks for them (Rollout Routing
        Replay, ``model.moe.routing_replay: rollout``). Routes cost memory (L x k small integers per position), so
        engines collect none unless asked.
        """
        self.return_routes = True

    def configure(self, sampling: SamplingConfig, tokenizer) -> None:
        """Called once by the data module with the run's sampling settings and tokenizer.

        Raises:
            ValueError: the tokenizer has no pad token (``gspo_lightning.models.load_tokenizer`` sets one), or
                ``top_p < 1`` / ``top_k > 0``: the engine would sample from a truncated, renormalised
                distribution while the trainer's log-probs cover the whole vocabulary (only the temperature is
                applied on both sides), so at identical weights the GSPO ratio is ~0.9 and a mismatch correction
                rejects the samples (docs/algorithms.md#rollouttrainer-mismatch).
        """
        if sampling.top_p < 1 or sampling.top_k > 0:
            raise ValueError(
                f"data.sampling has top_p={sampling.top_p}, top_k={sampling.top_k}: the trainer's log-probs do not"
                " describe a truncated sampling distribution, so ratios would be wrong at identical weights. Set"
                " top_p: 1.0 and top_k: 0 (the temperature is applied on both sides)."
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token: load it with gspo_lightning.models.load_tokenizer, which uses"
                " the EOS token as pad when a tokenizer has none."
            )
        self.sampling = sampling
        self.tokenizer = tokenizer

    @abstractmethod
    def bind(self, policy: nn.Module) -> None:
        """Attach the training policy (called once when training or validation starts)."""

    @property
    @abstractmethod
    def is_bound(self) -> bool:
        """Whether ``bind`` has been called."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        greedy: bool = False,
        max_new_tokens: list[int] | None = None,
    ) -> Generation:
        """Sample ``num_samples`` completions for each prompt (greedy decoding when ``greedy``).

        ``max_new_tokens`` (one per prompt, each at most ``sampling.max_new_tokens``) lowers the limit of single
        prompts: the multi-turn loop passes what is left of each trajectory's token budget. A completion cut by
        its own limit before EOS is ``truncated``.
        """

    def sync_weights(self, policy: nn.Module) -> bool:
        """Receive the updated policy weights after an optimizer step; returns whether weights were copied (an
        engine generating with the policy itself, as :class:`TransformersEngine` does, copies nothing)."""
        return False

    def close(self) -> None:  # noqa: B027 - optional: most engines hold nothing outside the process
        """Release what the engine holds outside this process (servers it started) when the data module tears
        down; a later generation binds it again."""


ENGINES: Registry[RolloutEngine] = Registry("engine", RolloutEngine)


def pad_left(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to (N, P) ids and a bool mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = True
    return ids, mask


def limit_rows(mask: Tensor, truncated: Tensor, limits: list[int] | None, eos_seen: Tensor) -> tuple[Tensor, Tensor]:
    """``mask`` cut to each row's own token limit, and the truncation flags updated for the rows it cut.

    Args:
        mask: (N, T) real response tokens.
        truncated: (N,) the flags at the call's limit.
        limits: one limit per row, or None (no change).
        eos_seen: (N, T) bool, True where the token is an end-of-sequence token.
    """
    if limits is None:
        return mask, truncated
    limit = torch.as_tensor(limits, dtype=torch.long)[:, None]
    kept = mask & (torch.arange(mask.shape[1])[None, :] < limit)
    cut = kept.sum(1) < mask.sum(1)
    ended = (eos_seen & kept).any(1)
    return kept, torch.where(cut, ~ended, truncated)


def response_mask_until_eos(response_ids: Tensor, eos_ids: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor]:
    """Mask of real response tokens (up to and including the first EOS) and the truncation flags.

    Args:
        response_ids: (N, T) generated tokens, possibly with pad after EOS.
        eos_ids: (E,) token ids that end a response.
        max_new_tokens: the generation limit.
    """
    is_eos = torch.isin(response_ids, eos_ids.to(response_ids.device))
    # tokens strictly after the first EOS are padding: count EOS seen before each position
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    has_eos = is_eos.any(dim=1)
    truncated = ~has_eos & (mask.sum(1) >= max_new_tokens)
    return mask, truncated
