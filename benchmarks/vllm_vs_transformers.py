"""Rollout throughput of VLLMEngine against TransformersEngine on the same model, prompts and G, and sync time.

    python benchmarks/vllm_vs_transformers.py [--rounds 10] [--model FOLDER]   # in the vLLM env (docs/vllm.md)

Both engines generate for the same B addition prompts x G samples, rounds alternating between them so that
machine noise hits both alike; throughput is generated tokens (the response masks' sum) per second of
``generate``. Two workloads: the demo's (up to 4 new tokens) and a longer one (up to 32). Then the weight
sync: the policy is nudged and pushed into vLLM ``--syncs`` times; seconds per push (gather, load, prefix
cache reset). The default model is the demo's built-in tiny Qwen3-MoE (warmed up, built on first use).
Compare the ratio, not the absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from gspo_lightning.data.encode import encode_prompts
from gspo_lightning.data.tasks import AdditionTask
from gspo_lightning.demo.model import prepare_builtin
from gspo_lightning.engines import SamplingConfig, TransformersEngine, VLLMEngine
from gspo_lightning.models import load_causal_lm, load_tokenizer


def default_model() -> str:
    return str(prepare_builtin("tiny-qwen3-moe-addition"))


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def throughput(engines: dict, prompts: list[list[int]], g: int, rounds: int, warmup: int) -> dict[str, float]:
    """Generated tokens per second of each engine, rounds interleaved."""
    tokens = dict.fromkeys(engines, 0.0)
    seconds = dict.fromkeys(engines, 0.0)
    for r in range(warmup + rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            gen = engine.generate(prompts, g)
            elapsed = time.perf_counter() - start
            if r >= warmup:
                tokens[name] += float(gen.response_mask.sum())
                seconds[name] += elapsed
    return {name: tokens[name] / seconds[name] for name in engines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the demo model)")
    parser.add_argument("--prompts", type=int, default=32, help="B")
    parser.add_argument("--num-samples", type=int, default=8, help="G")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--syncs", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--max-num-seqs", type=int, default=None, help="vLLM sequences per step")
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (enforce_eager=False)")
    args = parser.parse_args()
    import vllm

    path = args.model or default_model()
    tokenizer = load_tokenizer(path)
    records = AdditionTask(num_digits=2, seed=0).train()[: args.prompts]
    prompts = [p.input_ids for p in encode_prompts(records, tokenizer, max_prompt_length=64)[0]]
    torch.manual_seed(0)
    policy = load_causal_lm(path).eval()
    hf, ours = (
        TransformersEngine(),
        VLLMEngine(kv_cache_memory_bytes=256 << 20, enforce_eager=not args.compile, max_num_seqs=args.max_num_seqs),
    )
    engines = {"transformers": hf, "vllm": ours}
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    print(f"versions: vllm {vllm.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"model: {path} ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters)")
    print(f"workload: B={len(prompts)} prompts x G={args.num_samples}, {args.rounds} rounds after {args.warmup}")
    print(f"vLLM: {'torch.compile' if args.compile else 'eager'}\n")
    print("| max new tokens | transformers tok/s | vLLM tok/s | vLLM / transformers |")
    print("| ---: | ---: | ---: | ---: |")
    for max_new in args.max_new_tokens:
        for engine in engines.values():
            engine.configure(SamplingConfig(temperature=1.0, max_new_tokens=max_new), tokenizer)
            engine.bind(policy)
        rates = throughput(engines, prompts, args.num_samples, args.rounds, args.warmup)
        ratio = rates["vllm"] / rates["transformers"]
        print(f"| {max_new} | {rates['transformers']:.0f} | {rates['vllm']:.0f} | {ratio:.2f}x |")
    times = []
    for i in range(args.syncs):
        with torch.no_grad():
            next(policy.parameters()).add_(1e-4 * (i + 1))
        ours.push_weights(policy)
        times.append(ours.last_sync_s)
    print(
        f"\nweight sync ({sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters): "
        f"mean {statistics.mean(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms "
        f"over {len(times)} pushes"
    )
    ours.shutdown()


if __name__ == "__main__":
    main()
