"""Environments: a stateful object per trajectory that answers each model turn.

:class:`Environment` is the base class (``data.environment: my_module.MyEnv``; one instance per trajectory,
built with no arguments, then :meth:`~Environment.reset` from its prompt's row). Each model turn goes to
:meth:`~Environment.step`, which returns the messages appended before the model speaks again, a reward for the
turn and whether the trajectory is done. Its public methods with type hints and a docstring are its tools (as
TRL's ``environment_factory``): the default ``step`` runs the tool calls the parser found against them and ends
the trajectory at the first turn without a call. ``data.tools`` is the stateless case, :class:`ToolEnvironment`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gspo_lightning.agents.parsers import ParsedTurn
from gspo_lightning.agents.tools import CallTimer, Toolbox
from gspo_lightning.registry import Registry


@dataclass
class Turn:
    """One model turn, as the environment sees it.

    Attributes:
        text: the turn decoded (special tokens removed).
        parsed: the tool calls the parser found in it.
        index: 0 for the first turn.
    """

    text: str
    parsed: ParsedTurn
    index: int


@dataclass
class Step:
    """An environment's answer to one turn.

    Attributes:
        messages: chat messages appended after the turn (``{"role": "tool", "content": ...}`` for tool results,
            ``{"role": "user", ...}`` for other feedback); the chat template renders them, and only they are
            tokenised (the conversation so far is never re-rendered).
        reward: this turn's reward; a trajectory's rewards are summed into its return (``TrajectoryReward``).
        done: end the trajectory now (nothing is appended).
        tool_calls / tool_errors: calls answered, and how many of them failed (counted in the rollout metrics).
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    tool_calls: int = 0
    tool_errors: int = 0


class Environment:
    """Base class of environments: one instance per trajectory; ``reset`` from the row, ``step`` per model turn.

    Subclasses override :meth:`reset` and (for anything but tool use) :meth:`step`; public methods with type hints
    and a docstring are tools the model may call (listed in the prompt through the chat template).
    """

    _toolbox: Toolbox | None = None
    _timer: CallTimer | None = None  # set by the agent loop: the run's time limit on tool calls

    def reset(self, prompt: str, answer: str | None, **columns: Any) -> None:
        """Start a trajectory for this prompt row (its text, reference answer and other columns)."""

    def step(self, turn: Turn) -> Step:
        """Answer a model turn: run its tool calls, or end the trajectory when it makes none."""
        if not turn.parsed.has_calls:
            return Step(done=True)
        return self.run_tools(turn.parsed)

    # -- tools -------------------------------------------------------------------------------------------
    def tools(self) -> list[Callable[..., Any]]:
        """The tools: public methods defined by subclasses, other than ``reset``, ``step``, ``tools``, ``run_tools``."""
        own = set(vars(Environment))
        names = {n for cls in type(self).__mro__[:-1] if cls is not Environment for n in vars(cls)}
        methods = (getattr(self, n) for n in sorted(names - own) if not n.startswith("_"))
        return [m for m in methods if inspect.ismethod(m)]

    def toolbox(self, timer: CallTimer | None = None) -> Toolbox:
        """This instance's tools with their schemas, built on first use (a trajectory that calls no tool parses
        no docstring), calls timed by ``timer`` or the agent loop's."""
        if self._toolbox is None:
            self._toolbox = Toolbox(self.tools(), timer or self._timer)
        return self._toolbox

    def run_tools(self, parsed: ParsedTurn) -> Step:
        """One tool message per call, in order (a malformed call's message is its error)."""
        box = self.toolbox()
        messages, errors = [], len(parsed.errors)
        for call in parsed.calls:
            result = box.call(call)
            errors += result.error
            messages.append({"role": "tool", "name": call.name, "content": result.text})
        messages += [{"role": "tool", "content": text} for text in parsed.errors]
        return Step(messages=messages, tool_calls=len(parsed.calls) + len(parsed.errors), tool_errors=errors)


ENVIRONMENTS: Registry[Environment] = Registry("environment", Environment)


class ToolEnvironment(Environment):
    """Stateless tool use: the model calls plain functions (``data.tools``) until it answers without a call."""

    def __init__(self, toolbox: Toolbox) -> None:
        self._toolbox = toolbox

    def tools(self) -> list[Callable[..., Any]]:
        return list(self._toolbox.functions.values()) if self._toolbox is not None else []
