"""Random-init models of real shapes, saved as ordinary Hugging Face folders (no download).

A Qwen3 (dense) or Qwen3-MoE built from a config with Qwen's 151,936-token vocabulary, sizes selectable so a CPU
run stays within minutes, plus a word-level tokenizer that covers every id of that vocabulary (a random model
samples any of them; the tokenizer must decode them all). Both benchmark sides (``gspo-lightning`` and TRL)
load the same folder through ``from_pretrained``.

    python benchmarks/real_shapes.py OUT_DIR [--kind dense|moe] [--hidden 256] [--layers 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

VOCAB = 151_936
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def config(kind: str, hidden: int, layers: int, vocab: int = VOCAB, experts: int = 16, top_k: int = 2):
    """A Qwen3 / Qwen3-MoE config: head_dim 64, 2 key-value heads, tied embeddings as the small Qwen3 models."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    heads = max(hidden // 64, 2)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=vocab - 3, eos_token_id=vocab - 3, pad_token_id=vocab - 3,
    )  # fmt: skip
    if kind == "dense":
        return Qwen3Config(intermediate_size=3 * hidden, **common)
    if kind == "moe":
        return Qwen3MoeConfig(
            num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden, intermediate_size=3 * hidden,
            norm_topk_prob=True, **common,
        )  # fmt: skip
    raise ValueError(f"kind must be 'dense' or 'moe', got {kind!r}.")


def tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer of exactly ``vocab`` ids: digits and arithmetic symbols, ``w<i>`` fillers, and Qwen's
    special tokens at the top ids (``<|endoftext|>`` is pad and EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*"0123456789+-*=?. ", "What", "is", "Answer:"]
    words += [f"w{i}" for i in range(vocab - len(words) - len(SPECIALS))] + SPECIALS
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="w0"
    )
    fast.padding_side = "left"
    assert len(fast) == vocab
    return fast


def build(out: Path, kind: str = "dense", hidden: int = 256, layers: int = 2, seed: int = 0) -> Path:
    """Write a random-init model and its tokenizer to ``out`` (skipped when already there)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(kind, hidden, layers))
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", choices=["dense", "moe"], default="dense")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    print(build(args.out, args.kind, args.hidden, args.layers))


if __name__ == "__main__":
    main()
