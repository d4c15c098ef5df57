"""Asynchronous rollouts (``data.max_staleness``): seconds per rollout batch and learning per rollout batch.

    python benchmarks/async_rollouts.py speed [--batches 30] [--repeats 2] [--served PY [--served-only] [--pin]]
    python benchmarks/async_rollouts.py learning [--steps 3200]
    python benchmarks/async_rollouts.py gpu                    # one command for a GPU machine (see below)

``speed``: the demo (``configs/demo.yaml``) for ``--batches`` rollout batches at K = 0, 1, 2, runs alternating
(K order 0, 1, 2, 0, 1, 2, ...) so that machine noise hits every K alike; per run the median seconds between two
rollout batches' ends after the first 5 (set-up and the first generation excluded), and the median share of
generation hidden behind training (``time/overlap_frac``). With ``--served PY`` the same with the served engine:
one ``vllm serve`` started from the interpreter ``PY`` (vLLM's own virtualenv: ``bash .ci/vllm_env.sh``); ``--pin``
gives the server the last core and the trainer the others (``taskset``), so that the two stages have cores of
their own, as a server on GPUs of its own would.

``learning``: the whole demo at K = 0, 1, 2, the stale ones without and with a correction (``old_logprobs:
auto`` = the trainer's pi_old; + token TIS against the engine's log-probs); held-out greedy / sampled accuracy
before, at every evaluation, after. ``gpu``: ``speed`` on a real-shape model (a Qwen3-MoE of hidden 1024, 8
layers, random weights, 151,936-token vocabulary: ``benchmarks/real_shapes.py``) on the GPU, TransformersEngine,
256-token responses.

Each run is a ``gspo-lightning fit`` subprocess; figures go to stdout as markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "gspo_lightning" / "configs" / "demo.yaml"


class BatchClock(Callback):
    """Writes each rollout batch's end time and overlap share to ``$BATCH_CLOCK`` (one JSON line each)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = outputs["batch"].metrics
        with open(os.environ["BATCH_CLOCK"], "a") as out:
            out.write(json.dumps({"t": time.perf_counter(), "overlap": metrics.get("time/overlap_frac", 0.0),
                                  "wait": metrics.get("time/wait_for_rollout_s")}) + "\n")  # fmt: skip


def fit(python: str, args: list[str], clock: Path | None = None, prefix: list[str] | None = None,
        env_extra: dict | None = None) -> float:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    env.update(env_extra or {})
    if clock is not None:
        env["BATCH_CLOCK"] = str(clock)
    start = time.perf_counter()
    command = [*(prefix or []), python, "-m", "gspo_lightning.cli", "fit", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"fit failed ({' '.join(args)}):\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def speed(args) -> None:
    engines = {} if args.served_only else {"TransformersEngine": (sys.executable, [])}
    prefix, env = None, None
    if args.served:
        serve = [args.served, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        server_env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
        if args.pin:  # the server on the last core, the trainer on the others: each stage on cores of its own
            last = os.cpu_count() - 1
            serve = ["taskset", "-c", str(last), *serve]
            server_env["VLLM_CPU_OMP_THREADS_BIND"] = str(last)
            prefix, env = ["taskset", "-c", f"0-{last - 1}"], {"OMP_NUM_THREADS": str(last)}
        engine = {"class_path": "VLLMServerEngine", "init_args": {"serve_command": serve, "server_env": server_env}}
        engines["VLLMServerEngine (vllm-cpu)"] = (args.served, ["--data.engine", json.dumps(engine)])
    base = ["--config", str(DEMO), "--trainer.max_steps", str(4 * args.batches), "--data.heldout.size", "32",
            "--data.heldout.num_samples", "0", "--trainer.val_check_interval", "100000",
            "--trainer.callbacks+=async_rollouts.BatchClock", *args.extra]  # fmt: skip
    seconds: dict = {}
    overlap: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, (python, extra) in engines.items():
                for k in (0, 1, 2):
                    clock = Path(tmp) / f"{name}-{k}-{r}.jsonl"
                    served = name.startswith("VLLMServer")
                    fit(python, [*base, *extra, "--data.max_staleness", str(k),
                                 "--trainer.default_root_dir", str(Path(tmp) / clock.stem)], clock,
                        prefix if served else None, env if served else None)  # fmt: skip
                    rows = [json.loads(line) for line in clock.read_text().splitlines()][5:]
                    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(rows)]
                    seconds.setdefault((name, k), []).append(statistics.median(gaps))
                    overlap.setdefault((name, k), []).append(statistics.median(row["overlap"] for row in rows))
                    print(f"  {name} K={k} repeat {r}: {seconds[(name, k)][-1]:.3f} s/batch", flush=True)
    print("\n| engine | K | s / rollout batch (median of runs) | vs K=0 | generation hidden behind training |")
    print("| --- | --- | --- | --- | --- |")
    for (name, k), values in seconds.items():
        s, s0 = statistics.median(values), statistics.median(seconds[(name, 0)])
        print(f"| {name} | {k} | {s:.3f} ({', '.join(f'{v:.3f}' for v in values)}) | {s / s0:.2f}x |"
              f" {100 * statistics.median(overlap[(name, k)]):.0f}% |")  # fmt: skip


def learning(args) -> None:
    tis = ["--model.mismatch_correction", "MismatchCorrection"]
    runs = [("K=0 (synchronous)", 0, []), ("K=1, trainer's pi_old", 1, []), ("K=1, + token TIS", 1, tis),
            ("K=2, trainer's pi_old", 2, []), ("K=2, + token TIS", 2, tis)]  # fmt: skip
    print("| run | greedy before -> after | sampled before -> after | greedy at each evaluation | wall |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, k, extra in runs:
            root = Path(tmp) / f"k{k}-{len(extra)}"
            wall = fit(sys.executable, ["--config", str(DEMO), "--data.max_staleness", str(k), "--trainer.max_steps",
                                        str(args.steps), "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
            log_dir = root / "lightning_logs" / "version_0"
            report = json.loads((log_dir / "heldout_report.json").read_text())
            curve = greedy_curve(log_dir)
            b, a = report["before"], report["after"]
            print(f"| {label} | {100 * b['val/accuracy']:.1f}% -> {100 * a['val/accuracy']:.1f}% |"
                  f" {100 * b['val/accuracy_sampled']:.1f}% -> {100 * a['val/accuracy_sampled']:.1f}% |"
                  f" {' '.join(f'{100 * v:.0f}' for v in curve)} | {wall / 60:.1f} min |", flush=True)  # fmt: skip


def greedy_curve(log_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "val/accuracy" in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars("val/accuracy")]
    return values


def gpu(args) -> None:
    from real_shapes import build

    folder = build(Path(tempfile.gettempdir()) / "gspo-async-moe", "moe", hidden=1024, layers=8)
    args.extra = ["--trainer.accelerator", "gpu", "--model.policy.path", str(folder),
                  "--data.sampling.max_new_tokens", "256", "--data.rollout.prompts_per_step", "16",
                  "--model.policy.dtype", "bfloat16", "--data.encoding.chat_template", "false"]  # fmt: skip
    args.served = None
    speed(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "learning", "gpu"])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3200, help="learning: optimizer steps per run (the demo's)")
    parser.add_argument("--served", default=None, help="speed: vLLM's Python, to time the served engine too")
    parser.add_argument("--served-only", action="store_true", help="speed: the served engine only")
    parser.add_argument(
        "--pin", action="store_true", help="speed: the server on the last core, the trainer on the rest"
    )
    args = parser.parse_args()
    args.extra = []
    {"speed": speed, "learning": learning, "gpu": gpu}[args.mode](args)


if __name__ == "__main__":
    main()
