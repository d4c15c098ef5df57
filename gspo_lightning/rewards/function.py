"""Plain functions as rewards, configurable from YAML by import path."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs

EXTRA_KWARGS = ("response_lengths", "truncated", "max_new_tokens")


def _accepted_kwargs(fn: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The keyword names ``fn`` declares, and whether it takes ``**kwargs`` (then it receives every extra)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass the three positional lists only
        return frozenset(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(names), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@REWARDS.register
class FunctionReward(Reward):
    """A plain batched function as a reward: ``fn(prompts, completions, answers, **kwargs) -> scores``.

    ``fn`` receives three lists of N strings (answers may hold None) and, as keyword arguments where its
    signature accepts them (all of them with ``**kwargs``), ``response_lengths`` ((N,) int64 tensor),
    ``truncated`` ((N,) bool tensor), ``max_new_tokens`` (int) and the prompt rows' other columns
    (``RewardInputs.extras``: lists of N values, e.g. ``test_cases``), as TRL passes dataset columns. It
    returns N scores as a list of numbers (None or text is refused, naming the
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

    def score(self, inputs: RewardInputs) -> Tensor | Sequence[float]:
        """``fn``'s scores as it returned them (a generator drained to a list); the caller validates them."""
        names, takes_all = self._kwargs
        available = {**{k: getattr(inputs, k) for k in EXTRA_KWARGS}, **inputs.extras}
        extra = {k: v for k, v in available.items() if takes_all or k in names}
        out = self.fn(list(inputs.prompts), list(inputs.completions), list(inputs.answers), **extra)
        return list(out) if isinstance(out, Iterator) else out
