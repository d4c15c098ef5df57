"""The MoE stability study: GSPO vs GRPO on a tiny mixture-of-experts model, without and with Routing Replay.

Every arm is ``gspo-lightning fit`` on ``base.yaml`` + one algorithm preset from ``configs/algorithms/`` + at
most one overlay of this folder, so the arms share model, prompts, batch and optimiser and differ only in the
algorithm (docs/moe_stability.md says what was run and what it found)::

    python studies/moe_stability/run.py            # 5 arms x 3 seeds, ~17 min on 2 idle CPU cores
    python studies/moe_stability/run.py --quick     # 5 arms x 1 seed x 6 rollout batches, untrained model

Each run is its own process (``--jobs`` at a time, ``OMP_NUM_THREADS=--threads`` each) writing a CSV log under
``<out>/runs/<arm>/seed<k>/``; then ``collect.py`` tidies them into ``<out>/metrics.csv`` (one row per rollout
batch of each run), ``<out>/runs.csv`` and ``<out>/summary.md``, and ``plot.py`` draws ``<out>/*.png`` when
matplotlib is installed (``pip install -e ".[study]"``). A run that fails makes the study exit non-zero, after
collecting what the others wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import collect  # noqa: E402  (a sibling module of this script, not a package)

ALGORITHMS = ROOT / "gspo_lightning" / "configs" / "algorithms"
# arm -> the configs stacked on base.yaml, in order
ARMS: dict[str, tuple[Path, ...]] = {
    "gspo": (ALGORITHMS / "gspo.yaml",),
    "grpo": (ALGORITHMS / "grpo.yaml", HERE / "grpo_paper.yaml"),
    "grpo_r2": (ALGORITHMS / "grpo.yaml", HERE / "grpo_paper.yaml", HERE / "r2.yaml"),
    "grpo_r3": (ALGORITHMS / "grpo.yaml", HERE / "grpo_paper.yaml", HERE / "r3.yaml"),
    "gspo_r3": (ALGORITHMS / "gspo.yaml", HERE / "r3.yaml"),
}
QUICK_MODEL = "builtin:tiny-qwen3-moe16-random"  # same architecture, no warm-up: --quick checks the pipeline only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 6 rollout batches, untrained model (CI).")
    parser.add_argument("--out", type=Path, help="Output folder (default: results/, or results-quick/ with --quick).")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, help="Default: 0 1 2 (0 with --quick).")
    parser.add_argument("--rollout_batches", type=int, help="Per run: the rollout budget (default 300; 6 quick).")
    parser.add_argument("--val_every", type=int, help="Rollout batches between held-out evaluations (15; 3 quick).")
    parser.add_argument("--jobs", type=int, default=2, help="Runs at a time (default 2, one per core).")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run.")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.rollout_batches = args.rollout_batches or (6 if args.quick else 300)
    args.val_every = args.val_every or (3 if args.quick else 15)
    args.out = (args.out or HERE / ("results-quick" if args.quick else "results")).resolve()
    if args.rollout_batches < args.val_every:
        parser.error(f"--rollout_batches ({args.rollout_batches}) must be >= --val_every ({args.val_every}).")
    return args


def fit_command(arm: str, seed: int, args: argparse.Namespace, log_dir: Path) -> list[str]:
    """The ``gspo-lightning fit`` command line of one run."""
    configs = [HERE / "base.yaml", *ARMS[arm]]
    command = [sys.executable, "-c", "from gspo_lightning.cli import main; main()", "fit"]
    for config in configs:
        command += ["--config", str(config)]
    command += [
        "--seed_everything",
        str(seed),
        "--trainer.max_steps",
        str(4 * args.rollout_batches),  # base.yaml: 4 mini-batches per rollout batch
        "--trainer.val_check_interval",
        str(args.val_every),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(log_dir.parent),
        "--trainer.logger.name",
        log_dir.name,
        "--trainer.logger.version",
        "",
        "--data.prompts.init_args.seed",
        "0",  # one task split for every run: seeds vary the sampling and the updates, not the data
    ]
    if args.quick:
        command += ["--model.policy.path", QUICK_MODEL, "--data.prompts.init_args.num_val", "16"]
    return command


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Run one arm with one seed; returns its wall time and exit status (its log is in the run folder)."""
    log_dir = args.out / "runs" / arm / f"seed{seed}"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    with open(log_dir / "stdout.log", "w") as log:
        proc = subprocess.run(fit_command(arm, seed, args, log_dir), stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    print(f"  {arm:8s} seed {seed}: {status} in {wall:.0f} s", flush=True)
    return {"arm": arm, "seed": seed, "wall_s": wall, "returncode": proc.returncode}


def prepare_model(args: argparse.Namespace) -> float:
    """Build (or find cached) the study's model before the runs start, so no run pays for it; returns seconds."""
    from gspo_lightning.demo.model import prepare_builtin

    start = time.perf_counter()
    prepare_builtin(QUICK_MODEL.removeprefix("builtin:") if args.quick else "tiny-qwen3-moe16-addition6r")
    return time.perf_counter() - start


def machine() -> str:
    cores = os.cpu_count()
    with open("/proc/meminfo") as f:
        mem_gib = int(f.readline().split()[1]) / 2**20
    return f"{platform.processor() or platform.machine()}, {cores} cores, {mem_gib:.0f} GiB RAM, no GPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    study_start = time.perf_counter()
    build_s = prepare_model(args)
    print(
        f"model ready in {build_s:.0f} s; {len(args.arms)} arms x {len(args.seeds)} seeds x "
        f"{args.rollout_batches} rollout batches, {args.jobs} at a time -> {args.out}",
        flush=True,
    )
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed-major: every arm advances together
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args), jobs))
    manifest = {
        "machine": machine(),
        "quick": args.quick,
        "arms": {arm: [str(p.relative_to(ROOT)) for p in (HERE / "base.yaml", *ARMS[arm])] for arm in args.arms},
        "seeds": args.seeds,
        "rollout_batches": args.rollout_batches,
        "val_every": args.val_every,
        "jobs": args.jobs,
        "threads_per_run": args.threads,
        "model_build_s": round(build_s, 1),
        "study_wall_s": round(time.perf_counter() - study_start, 1),
        "runs": runs,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    collect.write_results(args.out, manifest)
    try:
        import plot
    except ImportError as err:  # matplotlib is an optional extra; the figures can be drawn later from metrics.csv
        print(f"plots skipped: {err}. Install the extra (pip install -e '.[study]') and run plot.py {args.out}.")
    else:
        plot.draw(args.out)
    failed = [f"{r['arm']} seed {r['seed']}" for r in runs if r["returncode"] != 0]
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (see stdout.log in their run folders)", file=sys.stderr)
        return 1
    print(f"study done in {manifest['study_wall_s'] / 60:.1f} min: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
