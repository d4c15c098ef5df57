"""The MoE stability study's --quick mode end to end (studies/moe_stability, docs/moe_stability.md): every arm
trains, the metrics the study reports are there, tidy and plotted, and the R3 arms replay every position."""

import json
import subprocess
import sys

import pandas as pd
from support import ROOT

STUDY = ROOT / "studies" / "moe_stability"
ARMS = {"gspo", "grpo", "grpo_r2", "grpo_r3", "gspo_r3"}


def test_the_quick_study_runs_every_arm_and_writes_its_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["arm"] for r in manifest["runs"]} == ARMS and all(r["returncode"] == 0 for r in manifest["runs"])

    metrics = pd.read_csv(tmp_path / "metrics.csv")
    steps = metrics[metrics["reward"].notna()]
    assert set(steps["arm"]) == ARMS
    assert (steps.groupby("arm")["rollout_batch"].max() == 6).all()
    assert (steps.groupby("arm")["train_s"].apply(lambda s: s.is_monotonic_increasing)).all()
    evals = metrics[metrics["val_accuracy"].notna()]
    assert sorted(set(evals["rollout_batch"])) == [0, 3, 6]  # before training, then every 3 rollout batches
    # what the study reports is measured in every arm: clipping, routing change, engine-vs-trainer routing
    for column in ("clip_frac_token", "clip_frac_seq", "routing_change_frac", "rollout_mismatch_frac", "entropy"):
        assert steps[column].notna().all(), column
    # the engine reports a route for every response position, so R3 replays all of them
    assert (steps["rollout_unrouted_frac"] == 0).all()
    replayed = steps[steps["arm"].str.endswith("_r3")]
    assert (replayed["routing_change_frac"] < 0.2).all()  # routers' own choice vs the engine's, same weights

    runs = pd.read_csv(tmp_path / "runs.csv")
    assert set(runs["arm"]) == ARMS and runs["collapsed"].dtype == bool
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {arm} |" in summary for arm in ARMS)
    for figure in ("accuracy.png", "clipping.png", "routing.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure
