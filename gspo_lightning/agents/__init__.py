"""Multi-turn, tool-using rollouts: tools, environments and rollout functions, one token-level trajectory out.

- :mod:`~gspo_lightning.agents.tools`: plain functions as tools (schemas, calls with a time limit).
- :mod:`~gspo_lightning.agents.parsers`: tool-call parsers (Hermes / Qwen ``<tool_call>`` JSON).
- :mod:`~gspo_lightning.agents.environment`: stateful environments, one per trajectory.
- :mod:`~gspo_lightning.data.chat` (with the prompts' rendering): the ids of appended messages, from the chat
  template, never re-rendering the conversation.
- :mod:`~gspo_lightning.agents.runner`: the batched turn loop; :mod:`~gspo_lightning.agents.sampler`: the choice
  between single turn, the loop, and a rollout function.
- :mod:`~gspo_lightning.agents.trajectory`: the trajectory contract.
"""

from gspo_lightning.agents.environment import ENVIRONMENTS, Environment, Step, ToolEnvironment, Turn
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.parsers import TOOL_PARSERS, HermesToolParser, ParsedTurn, ToolCall, ToolCallParser
from gspo_lightning.agents.trajectory import Trajectory

__all__ = [
    "ENVIRONMENTS",
    "TOOL_PARSERS",
    "AgentOptions",
    "Environment",
    "HermesToolParser",
    "ParsedTurn",
    "Step",
    "ToolCall",
    "ToolCallParser",
    "ToolEnvironment",
    "Trajectory",
    "Turn",
]
