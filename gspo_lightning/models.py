"""Loading the policy, reference model and tokenizer through ``from_pretrained``.

A name is a local folder, a hub id, or ``builtin:<name>`` for the embedded demo model, which the project
builds, warms up with a short supervised run, and caches as an ordinary Hugging Face folder (see
``gspo_lightning.demo``), so every path goes through the same ``from_pretrained`` code as a real model.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

BUILTIN_PREFIX = "builtin:"
DType = Literal["auto", "float32", "bfloat16", "float16"]
log = logging.getLogger(__name__)


def resolve_pretrained(name: str) -> str:
    """A ``from_pretrained`` argument for ``name`` (builds and caches built-in demo models)."""
    if name.startswith(BUILTIN_PREFIX):
        from gspo_lightning.demo.model import prepare_builtin

        return str(prepare_builtin(name[len(BUILTIN_PREFIX) :]))
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of ``name``, with a pad token (the EOS token when it has none) and left padding."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {name!r} has neither a pad nor an EOS token; set one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    name: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the project's conventions."""
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(resolve_pretrained(name), dtype=torch_dtype, **kwargs)
