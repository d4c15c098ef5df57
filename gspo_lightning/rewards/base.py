"""The reward interface: what a reward receives, what it returns, and how failures are reported.

Calling a reward validates its N scores and turns any exception into a :class:`RewardError` naming the
reward and, where one sample failed, its index and the start of its completion.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gspo_lightning.registry import Registry

EXCERPT_CHARS = 80


class RewardError(RuntimeError):
    """A reward failed or returned invalid scores; the message names the reward (and sample)."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The first ``limit`` characters of ``text`` as a quoted one-liner, with ``...`` when cut."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


@dataclass
class RewardInputs:
    """The N samples of one rollout step, as rewards see them.

    Attributes:
        prompts: N prompt texts.
        completions: N decoded completions (special tokens stripped).
        answers: N reference answers, None where the task has none.
        response_lengths: (N,) int64, the number of generated tokens.
        truncated: (N,) bool, True where generation hit ``max_new_tokens`` without EOS.
        max_new_tokens: the generation limit.
    """

    prompts: list[str]
    completions: list[str]
    answers: list[str | None]
    response_lengths: Tensor
    truncated: Tensor
    max_new_tokens: int

    def __post_init__(self) -> None:
        n = len(self.completions)
        self.response_lengths = torch.as_tensor(self.response_lengths, dtype=torch.int64)
        self.truncated = torch.as_tensor(self.truncated, dtype=torch.bool).to(self.response_lengths.device)
        got = (len(self.prompts), len(self.answers), self.response_lengths.shape, self.truncated.shape)
        if got != (n, n, (n,), (n,)):
            raise ValueError(
                f"RewardInputs: {n} completions, but {got[0]} prompts, {got[1]} answers, response_lengths of "
                f"shape {tuple(got[2])} and truncated of shape {tuple(got[3])}; every field needs N = {n}."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"RewardInputs: max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    def __len__(self) -> int:
        return len(self.completions)


class Reward(ABC):  # noqa: B024 (either of two methods may be implemented)
    """Base class. Subclasses implement either score_sample (one sample -> float) or score (batched).

    A reward carries no weight: weights belong to the combination (:func:`compute_rewards`).

    Args:
        name: the name used in logs; defaults to the class name.
    """

    def __init__(self, name: str | None = None) -> None:
        self._name = name

    @property
    def name(self) -> str:
        """The name used in logs (``rollout/reward_<name>``); the class name unless set."""
        return getattr(self, "_name", None) or type(self).__name__

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value

    def score(self, inputs: RewardInputs) -> Tensor:
        """(N,) float32 scores; the default calls :meth:`score_sample` on each sample."""
        if type(self).score_sample is Reward.score_sample:
            raise NotImplementedError(f"{type(self).__name__} must implement score() or score_sample().")
        values = []
        for i, completion in enumerate(inputs.completions):
            try:
                value = float(self.score_sample(inputs.prompts[i], completion, inputs.answers[i]))
            except Exception as e:
                raise RewardError(
                    f"Reward {self.name!r} failed on sample {i} (completion {excerpt(completion)}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            values.append(value)
        return torch.tensor(values, dtype=torch.float32)

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        """The score of one sample; implement this or :meth:`score`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score_sample().")

    def __call__(self, inputs: RewardInputs) -> Tensor:
        """Score ``inputs`` and validate: (N,) float32, finite, detached, on the device of the lengths.

        Raises:
            RewardError: the reward raised, or returned a wrong shape, a non-real dtype, NaN or inf.
        """
        try:
            out = self.score(inputs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"Reward {self.name!r} failed: {type(e).__name__}: {e}") from e
        return self._validate(out, inputs)

    def _validate(self, out: object, inputs: RewardInputs) -> Tensor:
        n = len(inputs)
        try:
            out = torch.as_tensor(out).detach()
        except Exception as e:
            raise RewardError(f"Reward {self.name!r} returned {type(out).__name__}, not (N,) numbers.") from e
        if tuple(out.shape) != (n,) or out.is_complex():
            raise RewardError(f"Reward {self.name!r} returned shape {tuple(out.shape)} {out.dtype}; expected ({n},).")
        out = out.to(device=inputs.response_lengths.device, dtype=torch.float32)
        bad = (~torch.isfinite(out)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise RewardError(
                f"Reward {self.name!r} returned a non-finite score {out[i].item()} for sample {i} "
                f"(completion {excerpt(inputs.completions[i])}); {bad.numel()} of {n} scores are NaN/inf."
            )
        return out


REWARDS: Registry[Reward] = Registry("reward", Reward)


def unique_names(names: list[str]) -> list[str]:
    """``names`` with repeats suffixed ``_1``, ``_2``, ... (the first keeps its name)."""
    out: list[str] = []
    for name in names:
        unique, k = name, 0
        while unique in out:
            k += 1
            unique = f"{name}_{k}"
        out.append(unique)
    return out


def check_weights(n_rewards: int, weights: Sequence[float] | None) -> list[float]:
    """``weights`` validated against ``n_rewards`` (all 1.0 when None)."""
    if n_rewards == 0:
        raise ValueError("No rewards given: configure at least one reward (e.g. MathAnswerReward).")
    if weights is None:
        return [1.0] * n_rewards
    weights = [float(w) for w in weights]
    if len(weights) != n_rewards:
        raise ValueError(f"{len(weights)} reward weights for {n_rewards} rewards; give one per reward.")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"Reward weights must be finite, got {weights}.")
    return weights


def compute_rewards(
    rewards: Sequence[Reward], weights: Sequence[float] | None, inputs: RewardInputs
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of ``rewards`` and each reward's unweighted scores.

    Args:
        rewards: the rewards to evaluate, each called once on ``inputs``.
        weights: one weight per reward; None weighs each by 1.
        inputs: the samples to score.

    Returns:
        ``(total, terms)``: total (N,) float32 ``sum_k w_k r_k``; terms maps each reward's name to its
        (N,) unweighted scores (repeated names get ``_1``, ``_2``, ...), for ``rollout/reward_<name>`` logs.

    Raises:
        ValueError: no rewards, or weights of the wrong length or not finite.
        RewardError: a reward failed or returned invalid scores.
    """
    rewards = list(rewards)
    ws = check_weights(len(rewards), weights)
    names = unique_names([r.name for r in rewards])
    total = torch.zeros(len(inputs), dtype=torch.float32, device=inputs.response_lengths.device)
    terms: dict[str, Tensor] = {}
    for name, reward, w in zip(names, rewards, ws, strict=True):
        terms[name] = reward(inputs)
        total = total + w * terms[name]
    return total, terms
