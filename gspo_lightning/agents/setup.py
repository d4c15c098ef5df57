"""Set-up of the data module's sampler: single turn, the agent loop over tools or an environment, or a rollout
function; every configuration problem is refused here, before the first rollout, in one line."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from gspo_lightning.agents.environment import Environment, ToolEnvironment
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.parsers import TOOL_PARSERS, ToolCallParser
from gspo_lightning.agents.runner import AgentRunner
from gspo_lightning.agents.sampler import AgentSampler, FunctionSampler, Sampler
from gspo_lightning.agents.tools import CallTimer, Toolbox
from gspo_lightning.data.chat import MessageRenderer, check_tool_template, rewrites_history

log = logging.getLogger(__name__)


def resolve_parser(name: str) -> ToolCallParser:
    """A parser from a registered name (``HermesToolParser``) or an import path (``my_pkg.parsers.MyParser``).

    Raises:
        ValueError: the name is neither, or names something that is not a :class:`ToolCallParser`.
    """
    if name in TOOL_PARSERS:
        return TOOL_PARSERS.build(name)
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ToolCallParser)):
        raise ValueError(
            f"data.agent.parser={name!r} is not a tool-call parser: use one of {', '.join(TOOL_PARSERS.names())} or"
            " the import path of a ToolCallParser subclass."
        )
    return cls()


def _probe_environment(factory) -> Environment:
    name = getattr(factory, "__qualname__", None) or getattr(
        getattr(factory, "func", None), "__qualname__", repr(factory)
    )
    try:
        env = factory()
    except Exception as e:
        raise ValueError(
            f"data.environment {name} could not be built with no arguments: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(env, Environment):
        raise ValueError(
            f"data.environment {name} built a {type(env).__name__}, not a gspo_lightning.agents.Environment: subclass"
            " Environment (reset from the prompt row, step per model turn)."
        )
    return env


def build_sampler(dm: Any) -> tuple[Sampler, list[dict]]:
    """The data module's sampler, and the tool schemas its prompts are rendered with.

    Args:
        dm: the ``RolloutDataModule``, set up up to its tokenizer (its tokenizer, engine, tools, environment,
            rollout function and agent options are read).
    """
    tokenizer, engine = dm.tokenizer, dm.engine
    if dm.rollout_function is not None:
        return FunctionSampler(dm.rollout_function, engine, tokenizer), []
    if not dm.tools and dm.environment is None:
        return Sampler(engine), []
    timer = CallTimer(dm.agent.tool_timeout_s)
    if dm.tools:
        toolbox = Toolbox(dm.tools, timer)
        schemas = toolbox.schemas

        def factory() -> Environment:
            return ToolEnvironment(toolbox)
    else:
        factory = dm.environment
        schemas = _probe_environment(factory).toolbox(timer).schemas
    if schemas:
        check_tool_template(tokenizer, schemas)
    renderer = MessageRenderer(tokenizer, schemas)
    if rewrites_history(tokenizer, schemas or None):
        log.warning(
            "The chat template of %r renders earlier turns differently once later turns follow (e.g. it drops"
            " reasoning blocks): trajectories are built token by token, so training sees exactly the ids the engine"
            " sampled and conditioned on, but a deployment that re-renders the conversation shows the model other"
            " text.",
            getattr(tokenizer, "name_or_path", ""),
        )
    parser = resolve_parser(dm.agent.parser)
    runner = AgentRunner(engine, tokenizer, factory, parser, dm.agent, renderer, timer=timer)
    return AgentSampler(runner), schemas


def check_budget(sampler: Sampler, agent: AgentOptions, context: int | None, longest_prompt: int) -> None:
    """Set the agent loop's token budget from the model's context (``data.agent.max_tokens``, else the context).

    Raises:
        ValueError: the budget exceeds the context, or leaves the longest prompt no room for a token.
    """
    runner = getattr(sampler, "runner", None)
    if runner is None:
        return
    budget = agent.max_tokens
    if isinstance(context, int) and budget is not None and budget > context:
        raise ValueError(
            f"data.agent.max_tokens={budget} exceeds the model's context (max_position_embeddings={context}):"
            f" set it to at most {context}, or null for the context length."
        )
    runner.budget = budget if budget is not None else context
    if runner.budget is not None and longest_prompt >= runner.budget:
        raise ValueError(
            f"The longest prompt has {longest_prompt} tokens, no fewer than the trajectory budget of {runner.budget}"
            " (data.agent.max_tokens, or the model's context): raise it or lower data.encoding.max_prompt_length."
        )
