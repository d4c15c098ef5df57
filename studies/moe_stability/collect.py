"""Tidy the study's CSV logs into one table per rollout batch, a summary per run and a table per arm.

Written next to each other in the study's output folder, so the figures can be redrawn without re-running:

- ``metrics.csv``: one row per rollout batch of every run (``arm, seed, rollout_batch, train_s`` and the columns
  of ``METRICS``), plus one row per held-out evaluation (``val_accuracy``, ``val_accuracy_sampled``); a row
  with ``rollout_batch`` 0 holds the accuracy before training; ``below_start`` flags evaluations under it.
- ``runs.csv``: per run, the start / final / best accuracy, the area under the curve, the collapse flag and
  the means of the stability metrics.
- ``summary.md``: per arm, mean +- std over seeds, collapses, and the accuracy at a common wall-clock budget.

Collapse (stated before the runs): a run collapsed when its greedy held-out accuracy at each of its last
``COLLAPSE_EVALS`` evaluations is below its accuracy before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

# logged name -> column of metrics.csv (per rollout batch; policy/* are the means over its 4 mini-batches)
METRICS = {
    "rollout/reward_mean": "reward",
    "policy/clip_frac_token": "clip_frac_token",
    "policy/clip_frac_seq": "clip_frac_seq",
    "moe/routing_change_frac": "routing_change_frac",
    "moe/rollout_routing_mismatch_frac": "rollout_mismatch_frac",
    "sampling/logprob_diff_mean": "logprob_gap_mean",
    "sampling/logprob_diff_max": "logprob_gap_max",
    "policy/entropy": "entropy",
    "policy/grad_norm": "grad_norm",
    "policy/ratio_max": "ratio_max",
    "moe/rollout_routing_unrouted_frac": "rollout_unrouted_frac",  # response positions the engine gave no route
}
TIME_COLUMNS = ("time/generate_s", "time/old_logprob_s", "time/ref_logprob_s", "time/reward_s", "time/train_s")
COLLAPSE_EVALS = 3


def tidy_run(metrics_csv: Path, arm: str, seed: int) -> pd.DataFrame:
    """One run's CSV log as rows per rollout batch and per evaluation.

    The logger's ``step`` counts rollout batches trained so far: training metrics of batch ``b`` (1-based) are
    written at step ``b - 1``, an evaluation after ``b`` batches at step ``b - 1`` too (the one before training
    at step 0 before any batch, and the final report at step ``b``). ``train_s`` is the cumulative time spent
    generating, scoring and updating (evaluations excluded: they cost every arm the same).
    """
    raw = pd.read_csv(metrics_csv)
    train = raw[raw["rollout/reward_mean"].notna()].reset_index(drop=True)
    steps = pd.DataFrame({"arm": arm, "seed": seed, "rollout_batch": train["step"].astype(int) + 1})
    present = [c for c in TIME_COLUMNS if c in train]
    steps["train_s"] = train[present].fillna(0).sum(axis=1).cumsum()
    for logged, column in METRICS.items():
        steps[column] = train[logged] if logged in train else float("nan")
    val = raw[raw["val/accuracy"].notna()][["step", "val/accuracy", "val/accuracy_sampled"]].reset_index(drop=True)
    # the first evaluation is the one before training (step 0, no batch yet); later ones follow batch `step + 1`,
    # except the final report, logged one step later than the last batch's metrics: same batch count
    batches = (val["step"].astype(int) + 1).clip(upper=int(steps["rollout_batch"].max()))
    batches.iloc[0] = 0
    evals = pd.DataFrame(
        {
            "arm": arm,
            "seed": seed,
            "rollout_batch": batches,
            "val_accuracy": val["val/accuracy"],
            "val_accuracy_sampled": val["val/accuracy_sampled"],
        }
    ).drop_duplicates("rollout_batch", keep="last")
    evals["train_s"] = evals["rollout_batch"].map(dict(zip(steps["rollout_batch"], steps["train_s"]))).fillna(0.0)
    evals["below_start"] = evals["val_accuracy"] < evals["val_accuracy"].iloc[0]  # a collapse is 3 in a row at the end
    return pd.concat([steps, evals], ignore_index=True).sort_values(["rollout_batch", "val_accuracy"])


def summarise_run(rows: pd.DataFrame) -> dict:
    """Start, final, best and mean accuracy, collapse and the stability means of one run's tidy rows."""
    evals = rows[rows["val_accuracy"].notna()].sort_values("rollout_batch")
    steps = rows[rows["reward"].notna()]
    start = float(evals["val_accuracy"].iloc[0])
    greedy = evals["val_accuracy"].to_numpy()
    span = evals["rollout_batch"].iloc[-1] - evals["rollout_batch"].iloc[0]
    # area under the accuracy curve over the rollout budget, as the mean accuracy over it (trapezoids)
    auc = float(((greedy[1:] + greedy[:-1]) / 2 * evals["rollout_batch"].diff().to_numpy()[1:]).sum() / span)
    tail = greedy[-COLLAPSE_EVALS:]
    return {
        "arm": rows["arm"].iloc[0],
        "seed": int(rows["seed"].iloc[0]),
        "start_accuracy": start,
        "final_accuracy": float(greedy[-1]),
        "final_accuracy_sampled": float(evals["val_accuracy_sampled"].iloc[-1]),
        "best_accuracy": float(greedy.max()),
        "auc_accuracy": auc,
        "collapsed": bool(len(greedy) > COLLAPSE_EVALS and (tail < start).all()),
        "train_s": float(steps["train_s"].iloc[-1]),
        **{f"mean_{c}": float(steps[c].mean()) for c in METRICS.values()},
    }


def accuracy_at(rows: pd.DataFrame, train_s: float) -> float:
    """Greedy accuracy of the last evaluation whose cumulative training time is within ``train_s``."""
    evals = rows[rows["val_accuracy"].notna() & (rows["train_s"] <= train_s + 1e-9)]
    return float(evals.sort_values("rollout_batch")["val_accuracy"].iloc[-1])


def arm_table(metrics: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per arm: mean +- std over seeds, collapses, and the accuracy at the common wall-clock budget (the mean
    training time of the fastest arm)."""
    budget = float(runs.groupby("arm")["train_s"].mean().min())
    at_budget = {(arm, seed): accuracy_at(group, budget) for (arm, seed), group in metrics.groupby(["arm", "seed"])}
    runs = runs.assign(accuracy_at_budget=[at_budget[(a, s)] for a, s in zip(runs["arm"], runs["seed"])])

    def pm(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        return f"{values.mean() * scale:.{digits}f} ± {std * scale:.{digits}f}"

    table = []
    for arm, group in runs.groupby("arm", sort=False):
        table.append(
            {
                "arm": arm,
                "seeds": len(group),
                "start %": pm(group["start_accuracy"]),
                "final greedy %": pm(group["final_accuracy"]),
                "final sampled %": pm(group["final_accuracy_sampled"]),
                "AUC greedy %": pm(group["auc_accuracy"]),
                "at budget %": pm(group["accuracy_at_budget"]),
                "collapses": f"{int(group['collapsed'].sum())}/{len(group)}",
                "train s": f"{group['train_s'].mean():.0f}",
                "clip tok %": pm(group["mean_clip_frac_token"], digits=2),
                "clip seq %": pm(group["mean_clip_frac_seq"], digits=2),
                "route change %": pm(group["mean_routing_change_frac"], digits=2),
                "rollout mismatch %": pm(group["mean_rollout_mismatch_frac"], digits=2),
            }
        )
    return pd.DataFrame(table), budget


def markdown(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def write_results(out: Path, manifest: dict) -> None:
    """Tidy every finished run under ``out/runs`` into metrics.csv, runs.csv and summary.md."""
    frames = []
    for run in manifest["runs"]:
        csv = out / "runs" / run["arm"] / f"seed{run['seed']}" / "metrics.csv"
        if run["returncode"] == 0 and csv.exists():
            frames.append(tidy_run(csv, run["arm"], run["seed"]))
    if not frames:
        print("no run finished: nothing to collect")
        return
    metrics = pd.concat(frames, ignore_index=True)
    metrics.to_csv(out / "metrics.csv", index=False, float_format="%.6g")
    runs = pd.DataFrame([summarise_run(group) for _, group in metrics.groupby(["arm", "seed"], sort=False)])
    wall = {(r["arm"], r["seed"]): r["wall_s"] for r in manifest["runs"]}
    runs["wall_s"] = [wall[(a, s)] for a, s in zip(runs["arm"], runs["seed"])]
    runs.to_csv(out / "runs.csv", index=False, float_format="%.6g")
    table, budget = arm_table(metrics, runs)
    text = [
        f"# MoE stability study: results ({'quick check' if manifest['quick'] else 'full study'})",
        "",
        f"Machine: {manifest['machine']}. {manifest['rollout_batches']} rollout batches per run (x 4 mini-batches),"
        f" held-out evaluation every {manifest['val_every']}; {len(manifest['seeds'])} seed(s);"
        f" {manifest['jobs']} runs at a time, {manifest['threads_per_run']} thread(s) each; study wall time"
        f" {manifest['study_wall_s'] / 60:.1f} min (model build {manifest['model_build_s']:.0f} s).",
        f"Common wall-clock budget: {budget:.0f} s of training (generation + scoring + updates) per run.",
        "",
        markdown(table),
        "",
        "Percentages: mean ± std over seeds. AUC: mean greedy accuracy over the rollout budget. Collapse: greedy"
        f" held-out accuracy below its start at each of the last {COLLAPSE_EVALS} evaluations.",
    ]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    (out / "arms.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1, ensure_ascii=False) + "\n")
    print("\n".join(text[-5:-2]))
