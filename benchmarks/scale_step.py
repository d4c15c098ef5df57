"""The training half at real shapes: seconds per stage, tokens/s, peak memory and padding, against the limit.

A random-init Qwen3 (``--kind dense``) or Qwen3-MoE (``--kind moe``) with Qwen's 151,936-token vocabulary
(``benchmarks/real_shapes.py``), synthetic rollout batches of ``--prompts`` x ``--samples`` sequences whose
response lengths are long-tailed (log-normal, clipped to 16 .. ``--max-response``), fed to the real training
step: ``GSPOModule.training_step`` under a Lightning ``Trainer`` (pre-update pass, mini-batch optimizer steps
over micro-batches). No generation: the rollout half is ``benchmarks/e2e_vs_trl.py``'s.

Each variant runs in a fresh process (peak RSS is per process), variants alternated, ``--repeats`` rounds:

- ``padded``: micro-batches of ``--micro-size`` sequences in batch order (the layout before token budgets);
- ``tokens``: ``micro_batch_tokens=--budget``, length-sorted, each micro-batch trimmed to its own widths;
- ``packed``: the same budget, padding-free (``padding_free: true``: real tokens only, one row per micro-batch);
- ``limit``: a plain forward + backward over exactly the real tokens, packed with the same budget, with the
  same log-prob head and AdamW step, and no RL terms: what the hardware needs for this work.

It prints per variant: seconds of the pre-update pass and of the update, tokens/s (real tokens of the rollout
batch over update seconds), peak RSS, the share of processed token slots that were padding, and the ratio of
the update to the limit measured in the same run.

    python benchmarks/scale_step.py [--kind dense|moe] [--hidden 256] [--layers 2] [--prompts 8] [--samples 4]
        [--max-response 1024] [--budget 4096] [--micro-size 8] [--mini-batches 1] [--steps 3] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import real_shapes

VARIANTS = ("padded", "tokens", "packed", "limit")


def lengths(n: int, max_response: int, seed: int):
    """Long-tailed response lengths: log-normal with median max_response / 8, clipped to 16 .. max_response."""
    import torch

    g = torch.Generator().manual_seed(seed)
    median = max_response / 8
    raw = torch.exp(math.log(median) + 1.0 * torch.randn(n, generator=g))
    return raw.round().long().clamp(16, max_response)


def synthetic_batch(n: int, group: int, prompt: int, max_response: int, vocab: int, seed: int):
    """A RolloutBatch: fixed-width prompts, long-tailed right-padded responses, random tokens and rewards."""
    import torch

    from gspo_lightning.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    resp = lengths(n, max_response, seed)
    t = int(resp.max())
    response_mask = torch.arange(t)[None, :] < resp[:, None]
    ids = torch.randint(0, vocab - 3, (n, prompt + t), generator=g)
    attention = torch.cat([torch.ones(n, prompt, dtype=torch.bool), response_mask], 1)
    rewards = torch.rand(n, generator=g)
    return RolloutBatch(
        input_ids=ids.masked_fill(~attention, vocab - 3),
        attention_mask=attention,
        response_mask=response_mask,
        rewards=rewards,
        group_ids=torch.arange(n) // group,
        truncated=resp == max_response,
        metrics={"rollout/reward_mean": float(rewards.mean())},  # what the data module reports with a batch
    )


def padding_share(batch, variant: str, micro_size: int, budget: int, mini_batches: int) -> float:
    """Padding slots over all processed token slots of one rollout batch's update forwards."""
    from gspo_lightning.training.splits import micro_batches, mini_batch_indices

    if variant in ("packed", "limit"):
        return 0.0
    slots = real = 0
    for index in mini_batch_indices(len(batch), mini_batches, False, None):
        mini = batch.select(index)
        tokens = budget if variant == "tokens" else None
        for _, part in micro_batches(mini, None if tokens else micro_size, tokens):
            slots += part.attention_mask.numel()
            real += int(part.attention_mask.sum())
    return 1 - real / slots


def run_module(args, variant: str, folder: Path) -> dict[str, float]:
    """The real training step under a Lightning Trainer; per-step seconds from the module's own timers."""
    import lightning.pytorch as pl
    import torch

    from gspo_lightning.module import GSPOModule
    from gspo_lightning.training.options import BatchingOptions, LossOptions, PolicyOptions, UpdateOptions

    n = args.prompts * args.samples
    batches = [
        synthetic_batch(n, args.samples, args.prompt, args.max_response, real_shapes.VOCAB, seed)
        for seed in range(args.steps)
    ]
    split = {"micro_batch_size": args.micro_size} if variant == "padded" else {"micro_batch_tokens": args.budget}
    module = GSPOModule(
        policy=PolicyOptions(path=str(folder)),
        update=UpdateOptions(mini_batches=args.mini_batches),
        batching=BatchingOptions(padding_free=variant == "packed", **split),
        loss=LossOptions(max_new_tokens=args.max_response),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6),
    )
    times: list[dict[str, float]] = []

    class SyntheticData(pl.LightningDataModule):
        """The data side the module needs: rollout batches, and a weight sync (nothing to sync: no engine)."""

        def train_dataloader(self):
            return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)

        def connect(self, link) -> None:  # no engine: nothing generates
            return None

        def sync_weights(self, policy) -> None:
            return None

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            total = time.perf_counter() - self.start
            metrics = outputs["batch"].metrics
            pre = metrics["time/old_logprob_s"] + metrics.get("time/ref_logprob_s", 0.0)
            times.append({"pre_update_s": pre, "update_s": total - pre})

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps * args.mini_batches, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=SyntheticData())
    measured = times[1:] or times  # the first rollout batch warms up
    real = statistics.mean(int(b.attention_mask.sum()) for b in batches)
    return {
        "pre_update_s": statistics.mean(t["pre_update_s"] for t in measured),
        "update_s": statistics.mean(t["update_s"] for t in measured),
        "real_tokens": real,
        "padding": padding_share(batches[0], variant, args.micro_size, args.budget, args.mini_batches),
    }


def run_limit(args, folder: Path) -> dict[str, float]:
    """Plain packed forward + backward over the real tokens, same head and optimizer, no RL terms."""
    import torch

    from gspo_lightning.models import load_causal_lm
    from gspo_lightning.training.logprobs import response_logprobs
    from gspo_lightning.training.splits import micro_batches

    model = load_causal_lm(str(folder)).train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    n = args.prompts * args.samples
    seconds, real = [], []
    for seed in range(args.steps):
        batch = synthetic_batch(n, args.samples, args.prompt, args.max_response, real_shapes.VOCAB, seed)
        start = time.perf_counter()
        for _ in range(args.mini_batches):  # as many passes over the batch as the module's optimizer steps
            optimizer.zero_grad(set_to_none=True)
            for _, part in micro_batches(batch, tokens=args.budget):
                out = response_logprobs(
                    model, part.input_ids, part.attention_mask, part.response_mask.shape[1], padding_free=True
                )
                (-out.logprobs.sum()).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    real = statistics.mean(
        int(
            synthetic_batch(
                n, args.samples, args.prompt, args.max_response, real_shapes.VOCAB, seed
            ).attention_mask.sum()
        )
        for seed in range(args.steps)
    )
    return {
        "pre_update_s": 0.0,
        "update_s": statistics.mean(seconds[1:] or seconds),
        "real_tokens": real,
        "padding": 0.0,
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = real_shapes.build(args.workdir / args.kind, args.kind, args.hidden, args.layers)
    result = run_limit(args, folder) if args.child == "limit" else run_module(args, args.child, folder)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["dense", "moe"], default="dense")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--max-response", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=4096, help="micro_batch_tokens of the token-budget variants")
    parser.add_argument("--micro-size", type=int, default=8, help="micro_batch_size of the padded variant")
    parser.add_argument("--mini-batches", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="rollout batches per variant (the first warms up)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gspo_scale_step")
    parser.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    real_shapes.build(args.workdir / args.kind, args.kind, args.hidden, args.layers)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    passthrough = [a for a in sys.argv[1:] if a != "--repeats"]
    for _ in range(args.repeats):
        for variant in args.variants:  # alternated: every round runs each variant once
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--child", variant], capture_output=True, text=True
            )
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"variant {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            results[variant].append(json.loads(line[len("RESULT ") :]))
    report(args, results)


def report(args, results: dict[str, list[dict[str, float]]]) -> None:
    med = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in results.items()}
    limit = med.get("limit", {}).get("update_s")
    print(
        f"\n{args.kind} Qwen3 hidden {args.hidden}, {args.layers} layers, vocabulary {real_shapes.VOCAB:,};"
        f" {args.prompts} x {args.samples} sequences, prompt {args.prompt},"
        f" responses log-normal 16..{args.max_response};"
        f" {args.mini_batches} mini-batch(es); budget {args.budget} tokens, padded micro-batches of {args.micro_size};"
        f" medians of {args.repeats} round(s), {args.steps - 1} measured rollout batch(es) each\n"
    )
    print("| variant | pre-update s | update s | tokens/s | peak RSS GiB | padding | update / limit |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, m in med.items():
        ratio = f"{m['update_s'] / limit:.2f}x" if limit else "-"
        print(
            f"| {variant} | {m['pre_update_s']:.2f} | {m['update_s']:.2f} | {m['real_tokens'] / m['update_s']:.0f} |"
            f" {m['peak_rss_gib']:.2f} | {m['padding']:.1%} | {ratio} |"
        )


if __name__ == "__main__":
    main()
