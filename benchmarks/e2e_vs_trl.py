"""End to end: ``gspo-lightning fit`` against TRL's ``GRPOTrainer`` on one model, prompt set and batch shape.

    python benchmarks/e2e_vs_trl.py [--trl-python PATH] [--kind dense|moe] [--hidden 256] [--layers 2]
        [--prompts-per-step 8] [--num-samples 4] [--prompt-words 32] [--max-new-tokens 384]
        [--mini-batches 4] [--micro-batch-size 8] [--rollout-batches 3] [--repeats 1] [--threads N]
        [--workdir DIR]

Both sides train the same random-init real-shape model (``benchmarks/real_shapes.py``: Qwen's 151,936-token
vocabulary) with GSPO (sequence-level ratio, clip 3e-4 / 4e-4, no KL, no reference model), AdamW lr 1e-6,
float32 on the CPU, no gradient checkpointing, rollouts with transformers ``generate`` at temperature 1,
top-p 1, no top-k. A rollout batch is B prompts x G samples; it is split into ``--mini-batches`` optimizer
steps of ``--micro-batch-size`` sequences each (pi_old log-probs from an extra pass on both sides). A random
model practically never samples EOS, so every response is ``--max-new-tokens`` long.

Each side runs in a fresh child process (the sides alternate with ``--repeats``) and reports its peak resident
set size (``ru_maxrss``: the whole process, model loading included), its seconds per rollout batch (wall time
between the ends of consecutive rollout batches, the first one a warm-up) split into generation and the rest,
and the peak RSS sampled in each phase: model loading, the first rollout batch's generation, the rest of the first
rollout batch (rewards, pi_old pass, optimizer steps), and everything later. The TRL side runs under
``--trl-python`` (default: this interpreter), which needs trl >= 1.16; without it only our side runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from side_measure import PHASES, Measure, versions  # noqa: E402

RESULT_TAG = "E2E_RESULT "
NUM_PROMPTS = 64
TRL_INSTALL = (
    'pip install -e ".[bench]" in a separate virtualenv (TRL pins its own versions), then pass its interpreter'
    " with --trl-python PATH"
)


def length_reward(prompts, completions, *args, **kwargs) -> list[float]:
    """The reward on both sides: a cheap score that varies between samples (the timing does not depend on it)."""
    return [len(c) % 10 / 10 for c in completions]


def model_dir(args: argparse.Namespace) -> Path:
    return args.workdir / f"model-{args.kind}-h{args.hidden}-l{args.layers}"


def prompts_path(args: argparse.Namespace) -> Path:
    return args.workdir / f"prompts-{args.prompt_words}w.jsonl"


def write_prompts(path: Path, words: int) -> None:
    """``NUM_PROMPTS`` prompts of ``words`` random digits separated by spaces (a space is a token of its own)."""
    rng = random.Random(0)
    rows = [{"prompt": " ".join(rng.choice("0123456789") for _ in range(words))} for _ in range(NUM_PROMPTS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_ours(args: argparse.Namespace, measure: Measure) -> dict:
    """``gspo-lightning fit`` through the LightningCLI Python API, on a config written to the workdir."""
    from lightning.pytorch.callbacks import Callback

    from gspo_lightning.cli import EXPECTED_WARNINGS, cli_main

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": args.mini_batches * args.rollout_batches,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": False,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(args.workdir / "ours"),
        },
        "model": {
            "policy": {"path": str(model_dir(args)), "dtype": "float32", "gradient_checkpointing": False},
            "ratio": "SequenceRatio",
            "clip": {"class_path": "PPOClip", "init_args": {"eps_low": 3.0e-4, "eps_high": 4.0e-4}},
            "loss": {"kl_coef": 0.0, "aggregation": "seq-mean-token-mean"},
            "update": {"mini_batches": args.mini_batches},
            "batching": {"micro_batch_size": args.micro_batch_size},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1.0e-6, "weight_decay": 0.0}},
        },
        "data": {
            "prompts": {
                "class_path": "FilePrompts",
                "init_args": {"path": str(prompts_path(args)), "answer_column": None},
            },
            "rewards": [{"class_path": "FunctionReward", "init_args": {"fn": "e2e_vs_trl.length_reward"}}],
            "engine": "TransformersEngine",
            "rollout": {"prompts_per_step": args.prompts_per_step, "num_samples": args.num_samples},
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": args.max_new_tokens},
        },
    }
    path = args.workdir / "ours.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML

    class RolloutEnds(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            measure.ends.append(time.perf_counter())

    sys.argv = sys.argv[:1]  # LightningCLI would also parse this script's own arguments
    cli = cli_main(["--config", str(path)], run=False)
    engine = cli.datamodule.engine
    engine.generate = measure.timed_generation(engine.generate)
    cli.trainer.callbacks.append(RolloutEnds())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return measure.result(versions("gspo-lightning", "torch", "transformers", "lightning"))


def trl_config(args: argparse.Namespace):
    """TRL's GRPOConfig for the same workload.

    A generation batch is ``per_device_train_batch_size x steps_per_generation`` = B x G completions (B prompts,
    each repeated ``num_generations`` times), trained on in ``steps_per_generation`` optimizer steps; as
    ``gradient_accumulation_steps`` is not a multiple of ``steps_per_generation``, TRL computes pi_old log-probs
    in an extra pass, as we do. ``loss_type="grpo"`` averages each sequence's token losses, then the sequences
    (our ``seq-mean-token-mean``; TRL recommends it for GSPO). TRL's defaults of bf16 and gradient
    checkpointing are switched off, and its linear decay replaced by a constant rate, as ours.
    """
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(args.workdir / "trl"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        seed=0,
        max_steps=args.mini_batches * args.rollout_batches,
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=1,
        steps_per_generation=args.mini_batches,
        num_generations=args.num_samples,
        num_iterations=1,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        importance_sampling_level="sequence",
        loss_type="grpo",
        epsilon=3e-4,
        epsilon_high=4e-4,
        beta=0.0,
        learning_rate=1e-6,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def run_trl(args: argparse.Namespace, measure: Measure) -> dict:
    """TRL's ``GRPOTrainer`` on the same model folder and prompt file."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    config = trl_config(args)
    assert config.generation_batch_size == args.prompts_per_step * args.num_samples, config.generation_batch_size
    model = AutoModelForCausalLM.from_pretrained(model_dir(args), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir(args))
    dataset = load_dataset("json", data_files=str(prompts_path(args)), split="train")

    class StepEnds(TrainerCallback):
        def on_step_end(self, args_, state, control, **kwargs) -> None:
            if state.global_step % args.mini_batches == 0:  # the last optimizer step of a rollout batch
                measure.ends.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepEnds()],
    )
    trainer._generate_single_turn = measure.timed_generation(trainer._generate_single_turn)
    trainer.train()
    return measure.result(versions("trl", "torch", "transformers", "accelerate"))


def child(args: argparse.Namespace) -> None:
    measure = Measure()  # first, so that the load phase covers the imports
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = (run_ours if args.child == "ours" else run_trl)(args, measure)
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_side(side: str, python: str, run: int, args: argparse.Namespace) -> dict:
    """Run one side in a fresh interpreter; its output goes to ``<workdir>/<side>-<run>.log``."""
    log = args.workdir / f"{side}-{run}.log"
    cmd = [python, str(Path(__file__).resolve()), *sys.argv[1:], "--workdir", str(args.workdir), "--child", side]
    print(f"[{side} #{run}] running, log: {log}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    lines = log.read_text().splitlines()
    found = [line[len(RESULT_TAG) :] for line in lines if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        tail = "\n".join(lines[-40:])
        raise SystemExit(f"The {side} side failed (exit status {proc.returncode}); the end of {log}:\n{tail}")
    return json.loads(found[-1])


def trl_available(python: str) -> bool:
    try:
        probe = subprocess.run([python, "-c", "import trl"], capture_output=True, check=False)
    except OSError:  # no such interpreter
        return False
    return probe.returncode == 0


def report(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    tokens = 2 * args.prompt_words - 1
    print("\n## Settings")
    print(
        f"model: random-init {args.kind} Qwen3, hidden {args.hidden}, {args.layers} layers, vocabulary 151,936,"
        f" float32, no gradient checkpointing ({model_dir(args)})\n"
        f"rollout batch: {args.prompts_per_step} prompts x {args.num_samples} samples, prompts of {tokens} tokens"
        f" ({args.prompt_words} digits and the spaces between them), {args.max_new_tokens} new tokens at"
        " temperature 1, top-p 1, no top-k\n"
        f"update: {args.mini_batches} optimizer steps per rollout batch, each on one micro-batch of"
        f" {args.micro_batch_size} sequences; GSPO (sequence ratio, clip 3e-4 / 4e-4, sequence-mean of token-means),"
        " no KL, no reference model; AdamW lr 1e-6, weight decay 0, max grad norm 1\n"
        f"ours: {args.workdir / 'ours.yaml'}; TRL: GRPOConfig(per_device_train_batch_size={args.micro_batch_size},"
        f" gradient_accumulation_steps=1, steps_per_generation={args.mini_batches},"
        f" num_generations={args.num_samples}, loss_type='grpo', importance_sampling_level='sequence',"
        " epsilon=3e-4, epsilon_high=4e-4, beta=0, bf16=False, gradient_checkpointing=False, use_vllm=False,"
        " lr_scheduler_type='constant')\n"
        f"{args.rollout_batches} rollout batches per run, the first a warm-up; {args.repeats} run(s) per side,"
        " alternating"
    )
    print("\n## Versions")
    for side, runs in results.items():
        info = ", ".join(f"{k} {v}" for k, v in runs[0]["versions"].items())
        print(f"{side}: {info}; {runs[0]['threads']} torch threads")
    print("\n## Results\n")
    columns = ["side", "run", "peak RSS GiB", "s / rollout batch", "generate s", "rest s"]
    print("| " + " | ".join([*columns, f"sampled peak GiB: {' / '.join(PHASES)}"]) + " |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for side, runs in results.items():
        for i, r in enumerate(runs):
            peaks = " / ".join(f"{v:.2f}" for v in r["sampled_peak_gib"].values())
            print(
                f"| {side} | {i} | {r['peak_rss_gib']:.2f} | {r['s_per_rollout_batch']:.1f} | {r['generate_s']:.1f}"
                f" | {r['update_s']:.1f} | {peaks} |"
            )
    if len(results) == 2:
        mean = {s: {k: statistics.mean(r[k] for r in runs) for k in ("peak_rss_gib", "s_per_rollout_batch")}
                for s, runs in results.items()}  # fmt: skip
        ours, trl = mean["gspo-lightning"], mean["trl"]
        print(
            f"\nours / TRL: peak RSS {ours['peak_rss_gib'] / trl['peak_rss_gib']:.2f}x,"
            f" seconds per rollout batch {ours['s_per_rollout_batch'] / trl['s_per_rollout_batch']:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed (TRL side)")
    parser.add_argument("--kind", choices=["dense", "moe"], default="dense")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8, help="B, prompts per rollout batch")
    parser.add_argument("--num-samples", type=int, default=4, help="G, samples per prompt")
    parser.add_argument("--prompt-words", type=int, default=32, help="digits per prompt (2 * words - 1 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per rollout batch")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--rollout-batches", type=int, default=3, help="per run, the first a warm-up (>= 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch's default)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gspo_e2e_vs_trl")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rollout_batches < 2:
        parser.error("--rollout-batches must be >= 2 (the first is a warm-up)")
    if args.mini_batches * args.micro_batch_size != args.prompts_per_step * args.num_samples:
        parser.error("--mini-batches x --micro-batch-size must equal --prompts-per-step x --num-samples")
    if args.child:
        child(args)
        return
    from real_shapes import build

    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"model: {build(model_dir(args), args.kind, args.hidden, args.layers)}", flush=True)
    write_prompts(prompts_path(args), args.prompt_words)
    sides = {"gspo-lightning": ("ours", sys.executable)}
    if trl_available(args.trl_python):
        sides["trl"] = ("trl", args.trl_python)
    else:
        print(f"trl is not importable from {args.trl_python}: only our side runs. To add TRL: {TRL_INSTALL}.")
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for run in range(args.repeats):
        for name, (side, python) in sides.items():
            results[name].append(run_side(side, python, run, args))
    report(args, results)


if __name__ == "__main__":
    main()
