"""The embedded demo model: a tiny Qwen3-MoE, supervised warm-up on addition, cached as an HF folder.

``prepare_builtin("tiny-qwen3-moe-addition")`` returns a folder that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load like any real checkpoint. It is built once per spec and cached under
``$GSPO_LIGHTNING_CACHE`` (default ``~/.cache/gspo_lightning``); a build is written to a temporary folder
and renamed into place, so concurrent processes (DDP ranks, parallel tests) never see half a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from gspo_lightning.data.tasks import AdditionTask
from gspo_lightning.demo.tokenizer import build_char_tokenizer, build_chat_tokenizer


@dataclass(frozen=True)
class DemoSpec:
    """Architecture and warm-up of a built-in demo model.

    The warm-up runs at most ``sft_steps`` steps and stops as soon as greedy accuracy on a probe of
    ``sft_probe_size`` training prompts (checked every ``sft_probe_every`` steps) reaches
    ``sft_target_accuracy``: RL then starts from a known accuracy, whatever the machine. Accuracy climbs
    steeply mid-warm-up, and thread count or CPU kernels move that climb by tens of steps, so a fixed step
    count would start the demo anywhere between 10% and 65%.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32  # vLLM's CPU attention kernels take head sizes of 32 and up
    num_experts: int = 8
    experts_per_token: int = 2
    expert_size: int = 128
    num_digits: int = 2
    reverse_digits: bool = False  # AdditionTask(reverse_digits=...): numbers least-significant digit first
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    sft_target_accuracy: float | None = 0.3
    sft_probe_every: int = 10
    sft_probe_size: int = 256
    seed: int = 0
    version: int = 2
    task: str = "addition"  # "multiplication-tools": the agent demo (tool-use warm-up traces)
    tool_use_rate: float = 0.0  # share of warm-up traces that call the tool (the rest answer directly)
    context: int = 64  # max_position_embeddings


BUILTINS: dict[str, DemoSpec] = {
    "tiny-qwen3-moe-addition": DemoSpec(),
    # no warm-up: for tests that only need a loadable model
    "tiny-qwen3-moe-random": DemoSpec(sft_steps=0),
    # the MoE stability study (studies/moe_stability): 16 experts top-2 in 4 layers, 8-token answers
    "tiny-qwen3-moe16-addition6r": DemoSpec(
        num_layers=4, num_experts=16, num_digits=6, reverse_digits=True, sft_steps=1500
    ),
    "tiny-qwen3-moe16-random": DemoSpec(num_layers=4, num_experts=16, num_digits=6, reverse_digits=True, sft_steps=0),
    # the agent demo (configs/tool_demo.yaml): 2-digit products, a multiply tool called in a quarter of the
    # warm-up traces; a fixed number of warm-up steps (greedy decoding answers directly, so no accuracy probe)
    "tiny-qwen3-moe-calculator": DemoSpec(
        task="multiplication-tools", tool_use_rate=0.25, context=128, sft_steps=800, sft_target_accuracy=None, version=3
    ),
    "tiny-qwen3-moe-calculator-random": DemoSpec(task="multiplication-tools", context=128, sft_steps=0, version=3),
}


def cache_root() -> Path:
    return Path(os.environ.get("GSPO_LIGHTNING_CACHE", Path.home() / ".cache" / "gspo_lightning"))


def demo_config(
    spec: DemoSpec, vocab_size: int, pad_id: int | None = None, eos_id: int | None = None, bos_id: int | None = None
) -> Qwen3MoeConfig:
    """The architecture of a built-in model (``gspo-lightning plan`` reads it without building the model)."""
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.expert_size * 2,
        moe_intermediate_size=spec.expert_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        max_position_embeddings=spec.context,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.01,
    )


def build_model(spec: DemoSpec, vocab_size: int, pad_id: int, eos_id: int, bos_id: int) -> Qwen3MoeForCausalLM:
    """A randomly initialised tiny Qwen3-MoE."""
    config = demo_config(spec, vocab_size, pad_id, eos_id, bos_id)
    torch.manual_seed(spec.seed)
    return Qwen3MoeForCausalLM(config)


def probe_accuracy(model: Qwen3MoeForCausalLM, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Greedy exact-match accuracy of ``model`` on ``prompts`` (left-padded, one batch)."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max(len(a) for a in answers) + 1,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(t.strip() == a for t, a in zip(texts, answers)) / len(answers)


def supervised_warmup(model: Qwen3MoeForCausalLM, tokenizer, spec: DemoSpec) -> dict[str, float]:
    """Teach the answer format ``a+b=c<eos>`` with a short cross-entropy run on completion tokens only.

    Returns:
        ``{"steps": steps run, "probe_accuracy": last probe accuracy}`` (``nan`` when no probe ran).
    """
    if spec.sft_steps == 0:
        return {"steps": 0, "probe_accuracy": float("nan")}
    task = AdditionTask(num_digits=spec.num_digits, seed=spec.seed, reverse_digits=spec.reverse_digits)
    examples = task.sft_examples(spec.sft_steps * spec.sft_batch_size, seed=spec.seed)
    probe_prompts, probe_answers = zip(*task.sft_examples(spec.sft_probe_size, seed=spec.seed + 1))
    eos = tokenizer.eos_token
    prompts = [p for p, _ in examples]
    full = [p + c + eos for p, c in examples]
    enc = tokenizer(full, padding=True, return_tensors="pt", add_special_tokens=False)
    prompt_len = torch.tensor([len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]])
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    width = ids.shape[1]
    # left padding: a token is part of the completion when it lies after the prompt's last token
    start = width - mask.sum(1) + prompt_len
    labels = ids.masked_fill(torch.arange(width)[None, :] < start[:, None], -100)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / spec.sft_steps)
    accuracy, steps = float("nan"), 0
    model.train()
    for step in range(spec.sft_steps):
        rows = slice(step * spec.sft_batch_size, (step + 1) * spec.sft_batch_size)
        out = model(
            input_ids=ids[rows],
            attention_mask=mask[rows].long(),
            position_ids=positions[rows],
            labels=labels[rows],
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        steps = step + 1
        if spec.sft_target_accuracy is not None and steps % spec.sft_probe_every == 0:
            accuracy = probe_accuracy(model, tokenizer, list(probe_prompts), list(probe_answers))
            if accuracy >= spec.sft_target_accuracy:
                break
    model.eval()
    return {"steps": steps, "probe_accuracy": accuracy}


LATER_FIELDS = {
    "reverse_digits": False,
    "task": "addition",
    "tool_use_rate": 0.0,
    "context": 64,
}  # fields added after models were cached: left out at their default


def _spec_hash(spec: DemoSpec) -> str:
    """A digest of ``spec``; fields added later count only when set, so existing cache folders keep their names."""
    fields = {k: v for k, v in asdict(spec).items() if LATER_FIELDS.get(k, object()) != v}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def prepare_builtin(name: str, root: Path | None = None) -> Path:
    """The cached folder of built-in model ``name``, built (and warmed up) on first use."""
    if name not in BUILTINS:
        raise ValueError(f"Unknown built-in model {name!r}. Built-ins: {', '.join(sorted(BUILTINS))}.")
    spec = BUILTINS[name]
    target = (root or cache_root()) / f"{name}-{_spec_hash(spec)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    rank_zero_info(f"Building the built-in model {name} (a supervised warm-up, once; cached in {target.parent})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tools = spec.task == "multiplication-tools"
        tokenizer = build_chat_tokenizer(save_dir=tmp) if tools else build_char_tokenizer("0123456789+=", save_dir=tmp)
        model = build_model(
            spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
        )
        if tools:
            from gspo_lightning.demo.tool_warmup import tool_warmup

            warmup = tool_warmup(model, tokenizer, spec)
        else:
            warmup = supervised_warmup(model, tokenizer, spec)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        # is_main_process: under torch.distributed transformers would otherwise write on rank 0 only
        model.save_pretrained(tmp, is_main_process=True)
        (tmp / "demo_spec.json").write_text(json.dumps({**asdict(spec), "warmup": warmup}, indent=2))
        rank_zero_info(f"Built {name}: {warmup['steps']} warm-up steps, probe accuracy {warmup['probe_accuracy']:.1%}")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
