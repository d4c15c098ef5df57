"""Plain functions as rewards, configurable from YAML by import path."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gspo_lightning.rewards.base import REWARDS, Reward, RewardInputs

EXTRA_KWARGS = ("response_lengths", "truncated", "max_new_tokens")


def _accepted_kwargs(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Which of :data:`EXTRA_KWARGS` ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass the three positional lists only
        return ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return EXTRA_KWARGS
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return tuple(k for k in EXTRA_KWARGS if k in names)


@REWARDS.register
class FunctionReward(Reward):
    """A plain batched function as a reward: ``fn(prompts, completions, answers, **kwargs) -> scores``.

    ``fn`` receives three lists of N strings (answers may hold None) and, as keyword arguments where its
    signature accepts them, ``response_lengths`` ((N,) int64 tensor), ``truncated`` ((N,) bool tensor) and
    ``max_new_tokens`` (int). It returns N scores as a list of floats or an (N,) tensor. In YAML::

        reward:
          class_path: FunctionReward
          init_args:
            fn: my_package.rewards.length_bonus

    Args:
        fn: the function, or in a config its dotted import path.
        name: the name used in logs; defaults to the function's ``__name__``.

    Raises:
        TypeError: ``fn`` is not callable.
    """

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionReward needs a callable fn, got {type(fn).__name__}: {fn!r}.")
        fn_name = getattr(fn, "__name__", "")
        super().__init__(name or (fn_name if fn_name.isidentifier() else None))
        self.fn = fn
        self._kwargs = _accepted_kwargs(fn)

    def score(self, inputs: RewardInputs) -> Tensor:
        extra = {k: getattr(inputs, k) for k in self._kwargs}
        out = self.fn(list(inputs.prompts), list(inputs.completions), list(inputs.answers), **extra)
        if isinstance(out, Tensor):
            return out
        try:
            return torch.as_tensor(list(out), dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise TypeError(f"fn returned {type(out).__name__}; expected a list of N floats or a tensor.") from e
