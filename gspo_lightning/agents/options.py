"""``data.agent``: the limits of multi-turn rollouts and the tool-call parser."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AgentOptions:
    """Limits of multi-turn rollouts (``data.tools``, ``data.environment``); ignored by single-turn ones.

    Attributes:
        max_turns: model turns per trajectory; a trajectory still calling tools at the last one ends ("max_turns").
        max_tokens: the token budget of a whole trajectory, prompt included (None: the model's context length);
            a turn that would pass it is cut there and the trajectory ends ("budget").
        max_tool_response_tokens: a tool or environment message longer than this is cut to it (and counted).
        tool_timeout_s: the limit in seconds on each tool call (None: none); a call that overruns answers an error.
        parser: the tool-call parser, a registered name (``HermesToolParser``) or an import path.
    """

    max_turns: int = 4
    max_tokens: int | None = None
    max_tool_response_tokens: int = 256
    tool_timeout_s: float | None = 30.0
    parser: str = "HermesToolParser"

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"data.agent.max_turns must be >= 1, got {self.max_turns}.")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(
                f"data.agent.max_tokens must be >= 2 (or null for the model's context), got {self.max_tokens}."
            )
        if self.max_tool_response_tokens < 1:
            raise ValueError(f"data.agent.max_tool_response_tokens must be >= 1, got {self.max_tool_response_tokens}.")
        timeout = self.tool_timeout_s
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):
            raise ValueError(f"data.agent.tool_timeout_s must be a number of seconds > 0 (or null), got {timeout!r}.")
