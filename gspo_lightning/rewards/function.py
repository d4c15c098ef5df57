"""Plain functions as rewards, configurable from YAML by import path."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs

MULTI_TURN_KWARGS = ("transcripts", "trajectory_rewards")  # passed only for multi-turn rollouts
EXTRA_KWARGS = ("response_lengths", "truncated", "max_new_tokens", *MULTI_TURN_KWARGS)


def _accepted_kwargs(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword names ``fn`` declares, and whether it takes ``**kwargs`` (then it receives every extra)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass the three positional lists only
        return frozenset(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(names), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _signature_problem(fn: Callable[..., Any], available: list[str]) -> tuple[str, str | None] | None:
    """What in ``fn``'s signature a call ``fn(prompts, completions, answers, **available)`` cannot satisfy:
    ("three lists", None) or ("argument", its name); None when the call binds (or there is no signature)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        bound = signature.bind_partial(None, None, None)
    except TypeError:
        return "three lists", None
    for p in signature.parameters.values():
        needed = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        if needed and p.name not in bound.arguments and p.name not in available:
            return "argument", p.name
    return None


@REWARDS.register
class FunctionReward(Reward):
    """A plain batched function as a reward: ``fn(prompts, completions, answers, **kwargs) -> scores``.

    ``fn`` receives three lists of N strings (answers may hold None) and, as keyword arguments where its
    signature accepts them (all of them with ``**kwargs``), ``response_lengths`` ((N,) int64 tensor),
    ``truncated`` ((N,) bool tensor), ``max_new_tokens`` (int), for multi-turn rollouts ``transcripts`` (N texts
    of whole trajectories) and ``trajectory_rewards`` ((N,) tensor; neither is passed for single turn), and the prompt
    rows' other columns (``RewardInputs.extras``: lists of N values, e.g. ``test_cases``), as TRL passes dataset
    columns. It returns N scores as a list of numbers (None or text is refused, naming the
    sample), an (N,) tensor or array, or a generator of N numbers. In YAML::

        reward:
          class_path: FunctionReward
          init_args:
            fn: my_package.rewards.length_bonus
            timeout_s: 60

    Args:
        fn: the function, or in a config its dotted import path.
        name: the name used in logs; defaults to the function's ``__name__``.
        timeout_s: a limit in seconds on each call of ``fn``, which then runs on a worker thread; None for
            none (see :class:`Reward`).

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``timeout_s`` is not None or a finite number > 0.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None, timeout_s: float | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable fn, got {type(fn).__name__}: {fn!r}.")
        fn_name = getattr(fn, "__name__", "")
        super().__init__(name or (fn_name if fn_name.isidentifier() else None), timeout_s)
        self.fn = fn
        self._kwargs = _accepted_kwargs(fn)

    def check_columns(self, columns: list[str], where: str) -> None:
        """Refuse a function whose arguments the prompt columns cannot fill: an argument without a default that
        names no column (nor ``response_lengths``, ``truncated``, ``max_new_tokens``), or a signature that cannot
        take the three lists. Extra columns ``fn`` does not take are not passed (all of them with ``**kwargs``).

        Raises:
            ValueError: in one line naming the function, the argument and the columns there are.
        """
        problem = _signature_problem(self.fn, [*EXTRA_KWARGS, *columns])
        if problem is None:
            return
        what, name = problem
        fn = getattr(self.fn, "__qualname__", None) or repr(self.fn)
        try:
            signature = f"{fn}{inspect.signature(self.fn)}"
        except (TypeError, ValueError):  # pragma: no cover (a problem needs a signature)
            signature = fn
        if what == "three lists":
            raise ValueError(
                f"FunctionReward {self.name!r} calls {fn}(prompts, completions, answers, **columns), but {signature}"
                " does not take three lists first: give it three positional parameters."
            )
        raise ValueError(
            f"FunctionReward {self.name!r} ({signature}) needs the argument {name!r}, but no column of {where} has"
            f" that name; their extra columns are {columns} (the prompt and answer columns arrive as prompts and"
            f" answers; also available: {', '.join(EXTRA_KWARGS)}). Rename the argument to a column, give it a"
            " default, or add the column to the prompts."
        )

    def score(self, inputs: RewardInputs) -> Tensor | Sequence[float]:
        """``fn``'s scores as it returned them (a generator drained to a list); the caller validates them."""
        names, takes_all = self._kwargs
        fields = {k: getattr(inputs, k) for k in EXTRA_KWARGS}
        fields = {k: v for k, v in fields.items() if v is not None or k not in MULTI_TURN_KWARGS}  # single turn: none
        available = {**fields, **inputs.extras}
        extra = {k: v for k, v in available.items() if takes_all or k in names}
        out = self.fn(list(inputs.prompts), list(inputs.completions), list(inputs.answers), **extra)
        return list(out) if isinstance(out, Iterator) else out
