"""Prompt data: prompt sources (files, synthetic tasks) and prompt tokenisation."""

from gspo_lightning.data.encode import EncodedPrompt, encode_prompts, prompt_texts, uses_chat_template
from gspo_lightning.data.hub import DatasetPrompts
from gspo_lightning.data.prompts import PROMPT_SOURCES, FilePrompts, PromptRecord, PromptSource
from gspo_lightning.data.rows import answer_to_str
from gspo_lightning.data.tasks import AdditionTask, MultiplicationTask

__all__ = [
    "PROMPT_SOURCES",
    "AdditionTask",
    "DatasetPrompts",
    "EncodedPrompt",
    "FilePrompts",
    "MultiplicationTask",
    "PromptRecord",
    "PromptSource",
    "answer_to_str",
    "encode_prompts",
    "prompt_texts",
    "uses_chat_template",
]
