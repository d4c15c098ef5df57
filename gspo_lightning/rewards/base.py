"""The reward interface: what a reward receives, what it returns, and how failures are reported.

Calling a reward validates its N scores and turns any exception into a :class:`RewardError` naming the
reward and, where one sample failed, its index and the start of its completion. A reward given ``timeout_s``
scores on a worker thread of its own (:mod:`gspo_lightning.rewards.timeout`) and fails with a
:class:`RewardError` when a call takes longer. Summing several rewards with weights is
:mod:`gspo_lightning.rewards.combine`'s.
"""

from __future__ import annotations

import numbers
from abc import ABC
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gspo_lightning.registry import Registry
from gspo_lightning.rewards.timeout import Worker, as_caller, check_timeout

EXCERPT_CHARS = 80


class RewardError(RuntimeError):
    """A reward failed or returned invalid scores; the message names the reward (and sample)."""


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The first ``limit`` characters of ``text`` as a quoted one-liner, with ``...`` when cut."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def describe(value: object, limit: int = 40) -> str:
    """``value``'s type and the start of its repr on one line, e.g. ``NoneType (None)``, ``str ('0.5')``."""
    return f"{type(value).__name__} ({' '.join(repr(value).split())[:limit]})"


def _not_a_number(value: object) -> bool:
    """True for None, text, and anything ``float()`` cannot convert (strings are never taken as scores)."""
    if value is None or isinstance(value, (str, bytes)):
        return True
    try:
        float(value)  # type: ignore[arg-type]
    except Exception:
        return True
    return False


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
        extras: column name -> N values: the prompt rows' other columns (e.g. test cases), repeated G times
            like ``answers``; function rewards receive them as keyword arguments.
        transcripts: for multi-turn trajectories, each one's text after the prompt (every turn, tool calls and
            results, special tokens kept); ``completions`` then hold each final model turn. None for single turn.
        trajectory_rewards: (N,) the environment's (or rollout function's) return of each trajectory, or None.
    """

    prompts: list[str]
    completions: list[str]
    answers: list[str | None]
    response_lengths: Tensor
    truncated: Tensor
    max_new_tokens: int
    extras: dict[str, list[Any]] = field(default_factory=dict)
    transcripts: list[str] | None = None
    trajectory_rewards: Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.completions)
        if self.transcripts is not None and len(self.transcripts) != n:
            raise ValueError(f"RewardInputs: {len(self.transcripts)} transcripts for {n} completions.")
        if self.trajectory_rewards is not None:
            self.trajectory_rewards = torch.as_tensor(self.trajectory_rewards, dtype=torch.float32)
            if self.trajectory_rewards.shape != (n,):
                raise ValueError(f"RewardInputs: trajectory_rewards must have shape ({n},).")
        self.response_lengths = torch.as_tensor(self.response_lengths, dtype=torch.int64)
        self.truncated = torch.as_tensor(self.truncated, dtype=torch.bool).to(self.response_lengths.device)
        got = (len(self.prompts), len(self.answers), self.response_lengths.shape, self.truncated.shape)
        if got != (n, n, (n,), (n,)):
            raise ValueError(
                f"RewardInputs: {n} completions, but {got[0]} prompts, {got[1]} answers, response_lengths of "
                f"shape {tuple(got[2])} and truncated of shape {tuple(got[3])}; every field needs N = {n}."
            )
        wrong = {k: len(v) for k, v in self.extras.items() if len(v) != n}
        if wrong:
            raise ValueError(f"RewardInputs: extras {wrong} do not have one value per completion (N = {n}).")
        if self.max_new_tokens < 1:
            raise ValueError(f"RewardInputs: max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    def __len__(self) -> int:
        return len(self.completions)


class Reward(ABC):  # noqa: B024 (either of two methods may be implemented)
    """Base class. Subclasses implement either score_sample (one sample -> float) or score (batched).

    A reward carries no weight: weights belong to the combination
    (:func:`~gspo_lightning.rewards.combine.compute_rewards`). A reward of your own takes ``timeout_s`` by
    passing it on to ``super().__init__`` (or by setting ``self.timeout_s``).

    Args:
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call (one batch of N completions); None for none. When set,
            scoring runs on a worker thread of this reward (a :class:`~gspo_lightning.rewards.timeout.Worker`,
            reused across calls, with the caller's grad mode and CUDA device), and a call still running after
            ``timeout_s`` raises :class:`RewardError` naming the reward. A Python thread cannot be stopped: the
            stuck call's thread is abandoned (a daemon, left running until it returns; it does not keep the
            process alive) and the next call gets a new worker.

    Raises:
        ValueError: ``timeout_s`` is not None or a finite number > 0.
    """

    def __init__(self, name: str | None = None, timeout_s: float | None = None) -> None:
        self._name = name
        self.timeout_s = timeout_s

    @property
    def name(self) -> str:
        """The name used in logs (``rollout/reward_<name>``); the class name unless set."""
        return getattr(self, "_name", None) or type(self).__name__

    @name.setter
    def name(self, value: str | None) -> None:
        self._name = value

    @property
    def timeout_s(self) -> float | None:
        """The limit in seconds on each call, None for none (see the class docstring)."""
        return getattr(self, "_timeout_s", None)

    @timeout_s.setter
    def timeout_s(self, value: float | None) -> None:
        self._timeout_s = check_timeout(value)

    def __getstate__(self) -> dict[str, Any]:
        """The state without the worker thread (copies and pickles start their own)."""
        state = dict(self.__dict__)
        state.pop("_worker", None)
        return state

    def check_columns(self, columns: list[str], where: str) -> None:
        """Refuse, at set-up, a reward that needs a prompt column ``columns`` lacks (``where``: which prompts).

        ``columns`` are the prompt rows' extra columns (``RewardInputs.extras``). The default checks the members of
        a composite reward (a ``rewards`` list, as :class:`~gspo_lightning.rewards.combine.WeightedReward` has);
        :class:`~gspo_lightning.rewards.function.FunctionReward` checks its function's arguments.

        Raises:
            ValueError: in one line naming the reward, what it needs and the columns there are.
        """
        for member in getattr(self, "rewards", ()):
            if isinstance(member, Reward):
                member.check_columns(columns, where)

    def score(self, inputs: RewardInputs) -> Tensor:
        """(N,) float32 scores; the default calls :meth:`score_sample` on each sample."""
        if type(self).score_sample is Reward.score_sample:
            raise NotImplementedError(f"{type(self).__name__} must implement score() or score_sample().")
        values = []
        for i, completion in enumerate(inputs.completions):
            try:
                value = self.score_sample(inputs.prompts[i], completion, inputs.answers[i])
                score = None if value is None or isinstance(value, (str, bytes)) else float(value)
            except Exception as e:
                raise RewardError(
                    f"Reward {self.name!r} failed on sample {i} (completion {excerpt(completion)}): "
                    f"{type(e).__name__}: {e}"
                ) from e
            if score is None:
                raise RewardError(
                    f"Reward {self.name!r} returned a {describe(value)} for sample {i} (completion "
                    f"{excerpt(completion)}); score_sample must return a float, e.g. 0.0 where a completion earns "
                    "nothing."
                )
            values.append(score)
        return torch.tensor(values, dtype=torch.float32)

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        """The score of one sample; implement this or :meth:`score`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score_sample().")

    def __call__(self, inputs: RewardInputs) -> Tensor:
        """Score ``inputs`` and validate: (N,) float32, finite, detached, on the device of the lengths.

        Raises:
            RewardError: the reward raised, took longer than ``timeout_s``, or returned something other than N
                numbers (None, text), a wrong shape, a non-real dtype, NaN or inf.
        """
        try:
            out = self._score_in_time(inputs)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"Reward {self.name!r} failed: {type(e).__name__}: {e}") from e
        return self._validate(out, inputs)

    def _score_in_time(self, inputs: RewardInputs) -> object:
        """:meth:`score`, on the worker thread and within ``timeout_s`` when one is set."""
        if self.timeout_s is None:
            return self.score(inputs)
        worker = self.__dict__.get("_worker")
        if worker is None:
            worker = self._worker = Worker(f"reward-{self.name}")
        future = worker.submit(as_caller(self.score), inputs)
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            if future.done():  # the reward itself raised TimeoutError
                raise
            self._worker = None  # its thread is stuck in this call: abandon it
            raise RewardError(
                f"Reward {self.name!r} took longer than {self.timeout_s:g} s on a batch of {len(inputs)} "
                "completions; raise timeout_s or fix the reward."
            ) from None

    def _not_numbers(self, out: object, inputs: RewardInputs) -> str:
        """Why ``out`` is not N numbers, naming the first bad element of a list, with the fix."""
        n = len(inputs)
        fix = f"return {n} numbers (a list of floats or a ({n},) tensor), e.g. 0.0 where a completion earns nothing."
        if isinstance(out, (list, tuple)):
            i = next((i for i, value in enumerate(out) if _not_a_number(value)), None)
            if i is not None:
                where = f" (completion {excerpt(inputs.completions[i])})" if i < n else f" of {len(out)}"
                return f"Reward {self.name!r} returned a {describe(out[i])} for sample {i}{where}; {fix}"
        return f"Reward {self.name!r} returned {describe(out)}, not {n} scores; {fix}"

    def _validate(self, out: object, inputs: RewardInputs) -> Tensor:
        n = len(inputs)
        if out is None or isinstance(out, (str, bytes, numbers.Number)):
            raise RewardError(self._not_numbers(out, inputs))
        try:
            out = torch.as_tensor(out).detach()
        except Exception as e:
            raise RewardError(self._not_numbers(out, inputs)) from e
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


def check_reward_columns(rewards: Iterable[Reward], extras: Iterable[Mapping[str, Any]], where: str) -> None:
    """Check ``rewards`` against the extra columns of the prompts they will score, before the first rollout.

    Args:
        rewards: the rewards (each checked with :meth:`Reward.check_columns`).
        extras: each prompt's extra columns (``PromptRecord.extras``); their union is what rewards may receive.
        where: which prompts, for the message (e.g. ``"the training prompts"``).

    Raises:
        ValueError: a reward needs a column none of the prompts has.
    """
    columns = list(dict.fromkeys(name for row in extras for name in row))
    for reward in rewards:
        reward.check_columns(columns, where)


REWARDS: Registry[Reward] = Registry("reward", Reward)
