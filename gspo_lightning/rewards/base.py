"""The reward interface: what a reward receives, what it returns, and how failures are reported.

Calling a reward validates its N scores and turns any exception into a :class:`RewardError` naming the
reward and, where one sample failed, its index and the start of its completion. A reward given ``timeout_s``
scores on a worker thread of its own and fails with a :class:`RewardError` when a call takes longer.
"""

from __future__ import annotations

import math
import numbers
import queue
import threading
import weakref
from abc import ABC
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gspo_lightning.registry import Registry

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


def check_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` as a float, validated: None (no limit) or a finite number of seconds > 0."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise ValueError(
            f"timeout_s must be a number of seconds > 0 (or None for no limit), got {timeout_s!r}; e.g. timeout_s: 60."
        )
    return float(timeout_s)


def _serve(jobs: queue.SimpleQueue) -> None:
    """A worker thread's loop: run ``(future, fn, args)`` jobs in order until a None arrives."""
    while (job := jobs.get()) is not None:
        future, fn, args = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, as concurrent.futures does
                future.set_exception(e)


class _Worker:
    """One daemon thread running submitted calls in order, stopped when this object is garbage collected.

    Unlike a ``ThreadPoolExecutor``, whose threads the interpreter joins at exit, a call stuck here never keeps
    the process alive.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self.thread.start()
        # stop the thread when this worker is dropped, but not at exit: a thread woken during interpreter
        # shutdown that runs torch code aborts the process
        weakref.finalize(self, self._jobs.put, None).atexit = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its result (or exception) arrives in the returned future."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future


def _as_caller(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to run under the calling thread's grad mode and CUDA device (both are per thread)."""
    grad = torch.is_grad_enabled()
    on_device = torch.cuda.device(torch.cuda.current_device()) if torch.cuda.is_initialized() else nullcontext()

    def run(*args: Any) -> Any:
        with torch.set_grad_enabled(grad), on_device:
            return fn(*args)

    return run


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
    """

    prompts: list[str]
    completions: list[str]
    answers: list[str | None]
    response_lengths: Tensor
    truncated: Tensor
    max_new_tokens: int
    extras: dict[str, list[Any]] = field(default_factory=dict)

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
        wrong = {k: len(v) for k, v in self.extras.items() if len(v) != n}
        if wrong:
            raise ValueError(f"RewardInputs: extras {wrong} do not have one value per completion (N = {n}).")
        if self.max_new_tokens < 1:
            raise ValueError(f"RewardInputs: max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    def __len__(self) -> int:
        return len(self.completions)


class Reward(ABC):  # noqa: B024 (either of two methods may be implemented)
    """Base class. Subclasses implement either score_sample (one sample -> float) or score (batched).

    A reward carries no weight: weights belong to the combination (:func:`compute_rewards`). A reward of
    your own takes ``timeout_s`` by passing it on to ``super().__init__`` (or by setting ``self.timeout_s``).

    Args:
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call (one batch of N completions); None for none. When set,
            scoring runs on a worker thread of this reward (one, reused across calls, with the caller's grad
            mode and CUDA device), and a call still running after ``timeout_s`` raises :class:`RewardError`
            naming the reward. A Python thread cannot be stopped: the stuck call's thread is abandoned (a
            daemon, left running until it returns; it does not keep the process alive) and the next call
            gets a new worker.

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
            worker = self._worker = _Worker(f"reward-{self.name}")
        future = worker.submit(_as_caller(self.score), inputs)
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
