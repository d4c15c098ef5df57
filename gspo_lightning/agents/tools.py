"""Plain Python functions as tools: their JSON schema for the chat template, and calls that never crash a run.

A tool is a function with type hints and a Google-style docstring (``Args:`` naming each parameter), as
transformers' :func:`~transformers.utils.get_json_schema` requires; that schema is what the tokenizer's chat
template renders (``apply_chat_template(tools=...)``). In YAML, ``data.tools: [my_module.search]``.

Calls run on a worker thread of the tool's own with a time limit (:mod:`gspo_lightning.rewards.timeout`'s
``Worker``); an unknown tool, arguments the function does not take, an exception or a timeout all become an
``Error: ...`` tool message for the model, counted in ``rollout/tool_errors_frac``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gspo_lightning.agents.parsers import ToolCall
from gspo_lightning.rewards.timeout import Worker, check_timeout


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """``fn``'s JSON schema (transformers' ``get_json_schema``).

    Raises:
        ValueError: in one line, when ``fn`` lacks type hints or a docstring describing its arguments.
    """
    from transformers.utils import get_json_schema

    name = getattr(fn, "__qualname__", repr(fn))
    try:
        return get_json_schema(fn)
    except Exception as e:
        raise ValueError(
            f"Tool {name} cannot be described to the model: {e}. Give every parameter a type hint and write a"
            " docstring with a one-line summary and an Args: section naming each parameter."
        ) from None


def render_result(value: Any) -> str:
    """A tool's return value as the text of its tool message (JSON for containers, ``str`` otherwise)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value)
        except TypeError:
            pass
    return str(value)


@dataclass
class ToolResult:
    """The text answered to one call, and whether it is an error (unknown tool, bad arguments, raise, timeout)."""

    text: str
    error: bool = False


class CallTimedOut(TimeoutError):
    """A call ran past :class:`CallTimer`'s limit (a ``TimeoutError`` the tool raises itself is not this)."""


class CallTimer:
    """Runs calls on a worker thread with a time limit (None: in the caller's thread); shared by the toolboxes of a
    run, so one thread serves every trajectory. A Python thread cannot be stopped: a call that overruns is
    abandoned on its daemon thread and the next call gets a new one."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self.timeout_s = check_timeout(timeout_s)
        self._worker: Worker | None = None

    def run(self, fn: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """``fn(**arguments)``; raises :class:`CallTimedOut` when it takes longer than ``timeout_s``."""
        if self.timeout_s is None:
            return fn(**arguments)
        if self._worker is None:
            self._worker = Worker("tool")
        future = self._worker.submit(lambda: fn(**arguments))
        try:
            return future.result(timeout=self.timeout_s)
        except TimeoutError:
            if future.done():  # the tool itself raised TimeoutError: its own failure, not the limit
                raise
            self._worker = None  # its thread is stuck in this call: abandon it
            raise CallTimedOut(f"the call took longer than {self.timeout_s:g} s") from None


class Toolbox:
    """Named tools with their schemas.

    Args:
        tools: the functions (bound methods included); names must be unique.
        timer: runs the calls with the run's time limit (default: no limit).

    Raises:
        ValueError: a tool without type hints or docstring, or two tools with one name.
    """

    def __init__(self, tools: Sequence[Callable[..., Any]], timer: CallTimer | None = None) -> None:
        self.schemas = [tool_schema(fn) for fn in tools]
        names = [s["function"]["name"] for s in self.schemas]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"Two tools are named {repeated}: give each tool a distinct function name.")
        self.functions = dict(zip(names, tools, strict=True))
        self.timer = timer or CallTimer()

    @property
    def names(self) -> list[str]:
        return list(self.functions)

    def __len__(self) -> int:
        return len(self.functions)

    def call(self, call: ToolCall) -> ToolResult:
        """Run one call; every failure is answered as an ``Error: ...`` text, never raised."""
        fn = self.functions.get(call.name)
        if fn is None:
            return ToolResult(f"Error: unknown tool {call.name!r}; the tools are {', '.join(self.names)}.", True)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return ToolResult(f"Error: bad arguments for tool {call.name!r}: {e}.", True)
        try:
            value = self.timer.run(fn, call.arguments)
        except CallTimedOut:
            return ToolResult(f"Error: tool {call.name!r} timed out after {self.timer.timeout_s:g} s.", True)
        except Exception as e:  # a tool's own failure is the model's to handle
            return ToolResult(f"Error: tool {call.name!r} raised {type(e).__name__}: {e}.", True)
        return ToolResult(render_result(value))
