"""Tool-call parsers: the model's turn (text) in, the tool calls it makes (or why they are malformed) out.

A parser is a swappable component (``data.agent.parser``, registry kind ``tool_parser``). The default,
:class:`HermesToolParser`, reads the Hermes / Qwen format the chat templates of Qwen2.5, Qwen3, Hermes and
many others teach: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number per turn.
"""

from __future__ import annotations

import contextlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from gspo_lightning.registry import Registry


@dataclass(frozen=True)
class ToolCall:
    """One call the model asked for: a tool name and its keyword arguments."""

    name: str
    arguments: dict[str, Any]

    def as_message_call(self) -> dict[str, Any]:
        """The call as a chat message's ``tool_calls`` entry (the OpenAI / transformers shape)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedTurn:
    """What a parser found in one model turn.

    Attributes:
        calls: the well-formed tool calls, in order.
        errors: one message per malformed call (bad JSON, no name, arguments not an object); each is answered to
            the model as a tool message and counted in ``rollout/tool_errors_frac``.
        content: the turn's text outside the tool calls.
    """

    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    content: str = ""

    @property
    def has_calls(self) -> bool:
        """Whether the model asked for any tool (a malformed call counts: it is answered with its error)."""
        return bool(self.calls or self.errors)


class ToolCallParser(ABC):
    """Base class of tool-call parsers: ``parse(text) -> ParsedTurn``."""

    @abstractmethod
    def parse(self, text: str) -> ParsedTurn:
        """The calls in one model turn (decoded with special tokens removed)."""


TOOL_PARSERS: Registry[ToolCallParser] = Registry("tool_parser", ToolCallParser)


@TOOL_PARSERS.register
class HermesToolParser(ToolCallParser):
    """Hermes / Qwen tool calls: ``<tool_call>{"name": "f", "arguments": {...}}</tool_call>``, any number per turn.

    A block whose JSON does not parse, has no string ``name``, or whose ``arguments`` is not an object (a JSON string
    holding one is accepted, as some models write it) is malformed: its error text goes back to the model. An
    opening tag never closed (the turn ran out of tokens) is malformed too.

    Args:
        start / end: the tags around each call.
    """

    def __init__(self, start: str = "<tool_call>", end: str = "</tool_call>") -> None:
        if not start or not end:
            raise ValueError("HermesToolParser needs non-empty start and end tags.")
        self.start, self.end = start, end
        self._block = re.compile(re.escape(start) + r"(.*?)" + re.escape(end), re.S)

    def parse(self, text: str) -> ParsedTurn:
        turn = ParsedTurn(content=self._block.sub("", text))
        for body in self._block.findall(text):
            call, error = self._call(body.strip())
            if call is not None:
                turn.calls.append(call)
            else:
                turn.errors.append(error)
        if self.start in turn.content:
            turn.content = turn.content.split(self.start)[0]
            turn.errors.append(f"Error: the tool call was not closed with {self.end}.")
        return turn

    @staticmethod
    def _call(body: str) -> tuple[ToolCall | None, str]:
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            return None, f"Error: the tool call is not valid JSON ({e.msg} at character {e.pos})."
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return None, 'Error: a tool call must be a JSON object with a string "name".'
        arguments = data.get("arguments", {})
        if isinstance(arguments, str):
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            return None, f'Error: the "arguments" of tool {data["name"]!r} must be a JSON object.'
        return ToolCall(name=data["name"], arguments=arguments), ""
