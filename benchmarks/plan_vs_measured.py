"""``gspo-lightning plan`` against measurement: predicted vs measured peak memory of short CPU fits.

Each configuration is a real ``fit`` (CPU, float32, TransformersEngine, 2 rollout batches, so the second runs
with the first's optimizer states and gradients) on a random-init model of real shape
(``benchmarks/real_shapes.py``), in its own process. Measured: the process's peak resident set size
(``ru_maxrss``) minus its RSS just before the model is loaded (Python, torch and Lightning imported, the data
module set up: tokenizer and prompts loaded), and the peaks sampled in generation and in the update. Predicted:
the planner on the same parsed configuration (``plan_run`` on what ``fit`` parses), this machine's RAM as the
device. A random model practically never samples EOS, and every prompt has the same length, set as
``data.encoding.max_prompt_length``: the planner's worst case (full-length prompts and responses) is what runs.

    python benchmarks/plan_vs_measured.py [--only NAME ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_shapes  # noqa: E402

GIB = 2**30
RESULT_TAG = "PLAN_RESULT "
PROMPT_WORDS = 16  # 31 tokens: digits and the spaces between them
TOLERANCE = 0.2
MMAP_THRESHOLD = 65536  # glibc then returns every freed block of 64 KiB or more to the OS at once
# name: model (kind, hidden, layers, vocabulary, experts), update (micro-batch, checkpointing), rollout shape
CONFIGS: dict[str, dict] = {
    "dense-V151936-mb4": dict(kind="dense", hidden=256, layers=2, vocab=real_shapes.VOCAB, micro=4, ckpt=False,
                              prompts=4, samples=4, new=32),
    "dense-h512-mb16": dict(kind="dense", hidden=512, layers=4, vocab=8192, micro=16, ckpt=False,
                            prompts=8, samples=4, new=96),
    "dense-h512-mb16-ckpt": dict(kind="dense", hidden=512, layers=4, vocab=8192, micro=16, ckpt=True,
                                 prompts=8, samples=4, new=96),
    "dense-h512-mb4": dict(kind="dense", hidden=512, layers=4, vocab=8192, micro=4, ckpt=False,
                           prompts=8, samples=4, new=96),
    "moe-h256-e16-mb16": dict(kind="moe", hidden=256, layers=4, vocab=8192, micro=16, ckpt=False,
                              prompts=8, samples=4, new=96),
    "moe-h256-e16-tokens-ckpt": dict(kind="moe", hidden=256, layers=4, vocab=8192, tokens=2048, ckpt=True,
                                     prompts=8, samples=4, new=96),
}  # fmt: skip


def model_dir(workdir: Path, c: dict) -> Path:
    """The random-init model of ``c``, written once (tied embeddings, head_dim 64, 2 KV heads)."""
    out = workdir / f"model-{c['kind']}-h{c['hidden']}-l{c['layers']}-v{c['vocab']}"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(
            real_shapes.config(c["kind"], c["hidden"], c["layers"], c["vocab"])
        ).save_pretrained(out)
        real_shapes.tokenizer(c["vocab"]).save_pretrained(out)
    return out


def write_config(workdir: Path, name: str, c: dict) -> Path:
    """The ``fit`` configuration of ``c`` (JSON is YAML): 2 rollout batches of 2 mini-batches."""
    prompts = workdir / "prompts.jsonl"
    if not prompts.exists():
        rng = random.Random(0)
        rows = [{"prompt": " ".join(rng.choice("0123456789") for _ in range(PROMPT_WORDS))} for _ in range(64)]
        prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-6}}
    model = {"policy": {"path": str(model_dir(workdir, c)), "dtype": "float32", "gradient_checkpointing": c["ckpt"]}}
    model.update({"update": {"mini_batches": 2}, "optimizer": optimizer})
    split = {"micro_batch_tokens": c["tokens"]} if "tokens" in c else {"micro_batch_size": c["micro"]}
    model["batching"] = split
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(workdir / "runs"),
        },
        "model": model,
        "data": {
            "prompts": {"class_path": "FilePrompts", "init_args": {"path": str(prompts), "answer_column": None}},
            "rewards": [{"class_path": "FunctionReward", "init_args": {"fn": "e2e_vs_trl.length_reward"}}],
            "engine": {"class_path": "TransformersEngine", "init_args": {"batch_size": c["prompts"]}},
            "rollout": {"prompts_per_step": c["prompts"], "num_samples": c["samples"]},
            "encoding": {"max_prompt_length": 2 * PROMPT_WORDS - 1},
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": c["new"]},
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))
    return path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(config: Path) -> None:
    """Run the fit of ``config`` here and print what it measured (GiB)."""
    import gc
    import warnings

    import torch

    from gspo_lightning.cli import EXPECTED_WARNINGS, cli_main

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    sys.argv = sys.argv[:1]
    cli = cli_main(["--config", str(config)], run=False)
    cli.datamodule.setup("fit")  # tokenizer and prompts: data-side memory the planner does not count
    gc.collect()
    base = _rss()
    peaks, phase = {}, ["update"]

    def sample() -> None:
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0), _rss())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    engine, generate = cli.datamodule.engine, cli.datamodule.engine.generate

    def timed(*args, **kwargs):
        phase[0] = "generation"
        try:
            return generate(*args, **kwargs)
        finally:
            phase[0] = "update"

    engine.generate = timed
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"base": base / GIB, "peak": (peak - base) / GIB, **{k: (v - base) / GIB for k, v in peaks.items()}}
    print(RESULT_TAG + json.dumps(out), flush=True)


def predict(config: Path):
    """The planner's :class:`~gspo_lightning.plan.MemoryPlan` for the configuration ``fit`` parses."""
    from gspo_lightning.cli import cli_main
    from gspo_lightning.plan import plan_run

    sys.argv = sys.argv[:1]
    return plan_run(cli_main(["--config", str(config)], run=False).config.as_dict())


def measure(config: Path, log: Path, fixed_threshold: bool) -> dict:
    """Run the fit of ``config`` in a fresh process; ``fixed_threshold``: glibc's mmap threshold fixed at 64 KiB."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    with open(log, "w") as out:
        cmd = [sys.executable, __file__, "--child", str(config)]
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    found = [line[len(RESULT_TAG) :] for line in log.read_text().splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{config.name} failed (exit status {proc.returncode}); see {log}")
    return json.loads(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gspo_plan_vs_measured")
    parser.add_argument("--default-malloc", action="store_true", help="also measure with glibc's default malloc")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    from gspo_lightning.plan import render

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.only or CONFIGS:
        c = CONFIGS[name]
        path = write_config(args.workdir, name, c)
        plan = predict(path)
        start = time.perf_counter()
        fixed = measure(path, args.workdir / f"{name}-fixed.log", True)
        default = measure(path, args.workdir / f"{name}-default.log", False) if args.default_malloc else None
        rows.append((name, plan, fixed, default, time.perf_counter() - start))
        print(f"\n### {name}\n\n{render(plan)}\nmeasured: {json.dumps([fixed, default])}", flush=True)
    print(
        "\n| configuration | predicted GiB (peak phase) | measured GiB: peak (generation / update) | ratio"
        " | default malloc: peak | ratio | baseline GiB | s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    bad = []
    for name, plan, fixed, default, seconds in rows:
        predicted = plan.peak / GIB
        ratio = predicted / fixed["peak"]
        bad += [name] if abs(ratio - 1) > TOLERANCE else []
        phases = f"{fixed.get('generation', 0):.3f} / {fixed.get('update', 0):.3f}"
        plain = f"{default['peak']:.3f} | {predicted / default['peak']:.2f}" if default else "- | -"
        print(
            f"| {name} | {predicted:.3f} ({plan.peak_phase}) | {fixed['peak']:.3f} ({phases}) | {ratio:.2f} | {plain}"
            f" | {fixed['base']:.2f} | {seconds:.0f} |"
        )
    print(f"\nwithin {TOLERANCE:.0%}: {len(rows) - len(bad)} of {len(rows)}" + (f"; outside: {bad}" if bad else ""))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
