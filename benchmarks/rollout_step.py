"""Seconds per rollout batch of a fixed demo workload, split by stage, and tokens per second.

    python benchmarks/rollout_step.py [--steps 30] [--warmup 5] [extra gspo-lightning fit args ...]

Runs the embedded demo (tiny Qwen3-MoE, B=32 prompts x G=8 samples, 4 mini-batches) through the real CLI
and prints the mean over the measured steps of: generation, pi_old log-prob pass, reference pass,
training (the optimizer steps), and overhead (the rest of the step: rewards, batching, logging).
Compare configurations as ratios within one run of this script; absolute seconds depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings

import torch
from lightning.pytorch.callbacks import Callback

from gspo_lightning.cli import DEMO_CONFIG, EXPECTED_WARNINGS, cli_main


class StepTimer(Callback):
    """Wall time of each training step and the stage times the module logs."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        wall = time.perf_counter() - self._start
        batch_out = outputs["batch"]  # the rollout batch training_step returns to callbacks
        m = batch_out.metrics
        train = float(trainer.callback_metrics["time/train_s"])
        old, ref = m.get("time/old_logprob_s", 0.0), m.get("time/ref_logprob_s", 0.0)
        self.rows.append(
            {
                "total": wall,
                "generate": m["time/generate_s"],
                "old_logprob": old,
                "ref_logprob": ref,
                "train": train - old - ref,
                "overhead": wall - m["time/generate_s"] - train,
                "tokens": float(batch_out.response_mask.sum()),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="measured rollout batches")
    parser.add_argument("--warmup", type=int, default=5, help="rollout batches not measured")
    args, extra = parser.parse_known_args()
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as root:
        cli = cli_main(
            [
                "--config",
                str(DEMO_CONFIG),
                "--trainer.max_steps",
                str(4 * (args.steps + args.warmup)),
                "--trainer.limit_val_batches",
                "0",
                "--trainer.callbacks",
                "[]",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.default_root_dir",
                root,
                *extra,
            ],
            run=False,
        )
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    rows = timer.rows[args.warmup :]
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    print(f"torch {torch.__version__}; {len(rows)} rollout batches measured after {args.warmup} warm-up")
    print(f"{'stage':14}{'s/step':>10}{'share':>9}")
    for key in ("generate", "old_logprob", "ref_logprob", "train", "overhead", "total"):
        print(f"{key:14}{mean[key]:10.4f}{100 * mean[key] / mean['total']:8.1f}%")
    print(f"tokens/s (generated tokens / step wall time): {mean['tokens'] / mean['total']:.1f}")


if __name__ == "__main__":
    main()
