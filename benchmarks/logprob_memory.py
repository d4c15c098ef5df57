"""Peak memory and time of one training micro-step's log-prob head at a real vocabulary, chunked vs full logits.

A random-init Qwen3 with Qwen's 151,936-token vocabulary (hidden 256, 2 layers, tied embeddings), one
micro-batch of ``--seqs`` sequences of ``--prompt`` + ``--response`` tokens: forward, entropy, backward of the
summed log-probs through ``response_logprobs``, with ``chunk_size=None`` (full (N, T, V) logits, the
implementation before chunking) and with chunks. Each measurement runs in a fresh process (peak RSS is per
process), alternating the two sides, ``--repeats`` times each.

    python benchmarks/logprob_memory.py [--seqs 8] [--prompt 128] [--response 384] [--chunks 1024 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VOCAB = 151_936


def measure(seqs: int, prompt: int, response: int, chunk: int | None) -> dict[str, float]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gspo_lightning.training.logprobs import response_logprobs

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).train()
    ids = torch.randint(0, VOCAB, (seqs, prompt + response))
    mask = torch.ones_like(ids, dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
    start = time.perf_counter()
    out = response_logprobs(model, ids, mask, response, with_entropy=True, chunk_size=chunk)
    out.logprobs.sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_gib": peak, "model_gib": base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=384)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        chunk = None if args.child == "full" else int(args.child)
        print(json.dumps(measure(args.seqs, args.prompt, args.response, chunk)))
        return
    sides = ["full", *map(str, args.chunks)]
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side in sides:  # alternate the sides within each repeat
            cmd = [sys.executable, __file__, "--child", side, "--seqs", str(args.seqs)]
            cmd += ["--prompt", str(args.prompt), "--response", str(args.response)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
    shape = f"{args.seqs} x ({args.prompt} + {args.response}) tokens, V={VOCAB}"
    print(f"log-prob head, one micro-step forward+backward, {shape}, median of {args.repeats}")
    full = statistics.median(r["peak_gib"] for r in rows["full"])
    full_s = statistics.median(r["seconds"] for r in rows["full"])
    print(f"{'head':>12} {'peak GiB':>9} {'model GiB':>10} {'seconds':>8} {'peak vs full':>13} {'time vs full':>13}")
    for side in sides:
        peak = statistics.median(r["peak_gib"] for r in rows[side])
        secs = statistics.median(r["seconds"] for r in rows[side])
        model = statistics.median(r["model_gib"] for r in rows[side])
        label = "full logits" if side == "full" else f"chunk {side}"
        print(f"{label:>12} {peak:9.2f} {model:10.2f} {secs:8.2f} {peak / full:12.2f}x {secs / full_s:12.2f}x")


if __name__ == "__main__":
    main()
