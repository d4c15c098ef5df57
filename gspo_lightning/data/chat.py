"""The token ids of messages appended between turns, from the chat template, without re-rendering the conversation.

A trajectory's ids are built token by token (token-in, token-out): the prompt's ids, then each model turn's
sampled ids exactly as the engine returned them, then the ids of the messages an environment appends. Only that
last part is tokenised here. The chat template renders it in context: a fixed probe conversation ending with an
assistant turn (calling one of the real tools, when there are tools) is rendered with and without the new
messages, and the new ids are the tokenisation of what the template writes after the probe's last end-of-turn
token, the token the model itself sampled (TRL's and SkyRL's approach: the separator the template puts after that
token, Qwen's newline, goes with the appended part), after checking that the template left the probe unchanged.

Templates that rewrite earlier turns (Qwen3 drops an earlier assistant turn's ``<think>`` block once a new user
turn follows) are detected by :func:`rewrites_history` and reported once: the ids trained on are still exactly the
ids the engine conditioned on, but a deployment that re-renders the history shows the model other text.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def _probe(tools: Sequence[dict]) -> list[dict[str, Any]]:
    """A user turn and an assistant turn (calling the first tool, when there are tools)."""
    if not tools:
        return [{"role": "user", "content": "1"}, {"role": "assistant", "content": "1"}]
    call = {"type": "function", "function": {"name": tools[0]["function"]["name"], "arguments": {}}}
    return [{"role": "user", "content": "1"}, {"role": "assistant", "content": "", "tool_calls": [call]}]


def _render(tokenizer, messages: list[dict[str, Any]], tools: Sequence[dict] | None, generation: bool) -> str:
    kwargs = {"tools": list(tools)} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)


class MessageRenderer:
    """Renders messages appended after a model turn as token ids, ready to concatenate (with the generation prompt).

    Args:
        tokenizer: the policy's tokenizer (it must have a chat template).
        tools: the JSON schemas the prompts were rendered with (some templates render tool messages differently
            when tools are declared).

    Raises:
        ValueError: the tokenizer has no chat template, or its template rewrites the probe's earlier text when a
            tool message follows (then no suffix is well defined).
    """

    def __init__(self, tokenizer, tools: Sequence[dict] | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"Multi-turn rollouts need a tokenizer with a chat template to render tool and environment messages;"
                f" {tokenizer.name_or_path!r} has none: use a chat model's tokenizer or set tokenizer.chat_template."
            )
        self.tokenizer, self.tools = tokenizer, list(tools or [])
        self.probe = _probe(self.tools)
        base = _render(tokenizer, self.probe, self.tools, generation=False)
        eos = tokenizer.eos_token or ""
        self.ends_with_eos = bool(eos) and eos in base
        if not self.ends_with_eos:
            log.warning(
                "The chat template does not write the EOS token %r after an assistant turn: appended messages follow"
                " the model's EOS with the template's text after the whole assistant turn.",
                eos,
            )
        self._prefix = base[: base.rindex(eos) + len(eos)] if self.ends_with_eos else base

    def text(self, messages: list[dict[str, Any]]) -> str:
        """What the template writes after a model turn for ``messages``, the next generation prompt included."""
        full = _render(self.tokenizer, [*self.probe, *messages], self.tools, generation=True)
        if not full.startswith(self._prefix):
            raise ValueError(
                "The chat template changes the earlier turns when a tool or environment message follows, so appended"
                " messages have no suffix to tokenise; use a template that renders history unchanged."
            )
        return full[len(self._prefix) :]

    def ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids appended to a trajectory after a model turn that ended with EOS (only they are tokenised)."""
        return list(self.tokenizer(self.text(messages), add_special_tokens=False)["input_ids"])


def renders_tools(tokenizer, tools: Sequence[dict]) -> bool:
    """Whether the chat template shows ``tools`` to the model (its rendering with them differs from without)."""
    messages = [{"role": "user", "content": "1"}]
    return _render(tokenizer, messages, tools, True) != _render(tokenizer, messages, None, True)


def check_tool_template(tokenizer, tools: Sequence[dict]) -> None:
    """Refuse a tokenizer whose chat template cannot show tools or render tool messages.

    Raises:
        ValueError: one line naming the problem and the fix.
    """
    name = getattr(tokenizer, "name_or_path", "")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"data.tools needs a tokenizer whose chat template renders tools; {name!r} has no chat template: use a"
            " chat model's tokenizer (e.g. Qwen3) or set tokenizer.chat_template."
        )
    if tools and not renders_tools(tokenizer, tools):
        raise ValueError(
            f"The chat template of {name!r} ignores tools (apply_chat_template(tools=...) renders nothing for them),"
            " so the model would never see the tools: use a tool-capable template (Qwen2.5/Qwen3, Hermes, Llama 3.1)."
        )
    probe = [{"role": "tool", "content": "\x01RESULT\x01"}]
    try:
        text = MessageRenderer(tokenizer, tools).text(probe)
    except Exception as e:
        raise ValueError(f"The chat template of {name!r} cannot render a tool message: {e}") from None
    if "\x01RESULT\x01" not in text:
        raise ValueError(
            f"The chat template of {name!r} drops tool messages (role 'tool'), so the model would never see tool"
            " results: use a tool-capable template."
        )


def rewrites_history(tokenizer, tools: Sequence[dict] | None = None) -> bool:
    """Whether the chat template renders an earlier part of a conversation differently once more turns follow.

    Probes a conversation with a reasoning block, a tool call and its result, and a second user turn: for each
    k the rendering of the first k messages must be a prefix of the rendering of the first k+1.
    """
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    conversation = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "<think>\nr\n</think>\n\na", "tool_calls": [call]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "<think>\ns\n</think>\n\nb"},
        {"role": "user", "content": "3"},
        {"role": "assistant", "content": "c"},
    ]
    try:
        texts = [_render(tokenizer, conversation[:k], tools, False) for k in range(1, len(conversation) + 1)]
    except Exception:
        return True
    return any(not later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
