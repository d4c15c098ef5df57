"""Tokenise prompt records: optional chat template, one batched tokenizer call, prompt-length filter.

Chat-templated text is tokenised with ``add_special_tokens=False`` (the template writes its own BOS, as
``tokenizer.apply_chat_template(tokenize=True)`` assumes); raw text uses the tokenizer's default special
tokens. Either way a doubled leading BOS (template or prompt text that already starts with it) is
reduced to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gspo_lightning.data.prompts import PromptRecord

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EncodedPrompt:
    """A prompt record with its token ids.

    Attributes:
        record: the source record (text, answer, index).
        input_ids: the tokenised prompt, chat template applied if used.
    """

    record: PromptRecord
    input_ids: list[int]


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool | None) -> bool:
    """Resolve the ``chat_template`` option: ``None`` means "when the tokenizer has one".

    Raises:
        ValueError: ``chat_template=True`` but the tokenizer has no template.
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat_template is None:
        return has_template
    if chat_template and not has_template:
        raise ValueError(
            f"chat_template=True, but the tokenizer ({type(tokenizer).__name__},"
            f" {tokenizer.name_or_path!r}) has no chat template. Use an instruct/chat model's tokenizer, set"
            " tokenizer.chat_template, or pass chat_template=False (or None) to feed the raw prompt text."
        )
    return bool(chat_template)


def prompt_texts(
    records: list[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    use_template: bool,
    system_prompt: str | None = None,
    tools: list[dict] | None = None,
) -> list[str]:
    """The text fed to the tokenizer for each record: the raw prompt, or the rendered chat template (a record's
    own conversation, ``PromptRecord.messages``, when it has one; ``system_prompt`` goes first unless the
    conversation starts with a system message).

    Raises:
        ValueError: conversations without a chat template to render them, or ``system_prompt`` without one.
    """
    if not use_template and any(r.messages for r in records):
        raise ValueError(
            "The prompts are chat messages, but the tokenizer has no chat template to render them (or"
            " chat_template=False). Use a chat model's tokenizer or set tokenizer.chat_template."
        )
    if not use_template:
        if system_prompt is not None:
            raise ValueError(
                "system_prompt needs a chat template, but prompts are fed as raw text. Use a tokenizer with"
                " a chat template (chat_template=True), or drop system_prompt and put the instruction in"
                " the prompts."
            )
        return [r.text for r in records]
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    conversations = [_conversation(r, system) for r in records]
    declared = {"tools": tools} if tools else {}  # the tools' JSON schemas, rendered by the template
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True, **declared)
    return [texts] if isinstance(texts, str) else list(texts)


def _conversation(record: PromptRecord, system: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The messages of one record: its own conversation, or its text as the user turn, after ``system``."""
    if not record.messages:
        return [*system, {"role": "user", "content": record.text}]
    if record.messages[0]["role"] == "system":
        return list(record.messages)
    return [*system, *record.messages]


def _dedupe_bos(ids: list[int], bos_id: int | None) -> list[int]:
    if bos_id is not None and len(ids) >= 2 and ids[0] == bos_id and ids[1] == bos_id:
        k = 1
        while k < len(ids) and ids[k] == bos_id:
            k += 1
        return ids[k - 1 :]
    return ids


def encode_prompts(
    records: list[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    on_overlong: Literal["drop", "error"] = "drop",
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    tools: list[dict] | None = None,
) -> tuple[list[EncodedPrompt], int]:
    """Tokenise ``records`` in one batched call and filter out prompts longer than ``max_prompt_length``.

    Args:
        records: the prompts, in order.
        tokenizer: the policy's tokenizer.
        max_prompt_length: longest prompt kept, in tokens (after the chat template).
        on_overlong: "drop" skips longer prompts; "error" raises naming how many and the longest.
        chat_template: ``None`` applies the tokenizer's chat template when it has one; ``True`` requires one;
            ``False`` feeds the raw text.
        system_prompt: a system message put before each prompt (needs a chat template).
        tools: JSON schemas of the tools the model may call, rendered by the chat template (needs one).

    Returns:
        The kept prompts (input order) and how many were dropped.

    Raises:
        ValueError: bad options, overlong prompts with ``on_overlong="error"``, or every prompt dropped.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}.")
    if on_overlong not in ("drop", "error"):
        raise ValueError(f"on_overlong must be 'drop' or 'error', got {on_overlong!r}.")
    if not records:
        return [], 0
    use_template = uses_chat_template(tokenizer, True if tools else chat_template)
    texts = prompt_texts(records, tokenizer, use_template, system_prompt, tools)
    special = {"add_special_tokens": False} if use_template else {}
    all_ids = tokenizer(texts, return_attention_mask=False, verbose=False, **special)["input_ids"]
    bos_id = tokenizer.bos_token_id
    all_ids = [_dedupe_bos(list(ids), bos_id) for ids in all_ids]

    too_long = [len(ids) for ids in all_ids if len(ids) > max_prompt_length]
    if too_long and on_overlong == "error":
        raise ValueError(
            f"{len(too_long)} of {len(records)} prompts exceed max_prompt_length={max_prompt_length} tokens"
            f" (longest: {max(too_long)} tokens). Raise max_prompt_length, or set on_overlong='drop' to"
            " skip them."
        )
    kept = [EncodedPrompt(record=r, input_ids=ids) for r, ids in zip(records, all_ids) if len(ids) <= max_prompt_length]
    if not kept:
        raise ValueError(
            f"All {len(records)} prompts exceed max_prompt_length={max_prompt_length} tokens (shortest:"
            f" {min(too_long)}, longest: {max(too_long)}). Raise max_prompt_length."
        )
    return kept, len(too_long)
