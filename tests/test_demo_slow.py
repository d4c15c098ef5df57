"""The README's demo: GSPO must raise held-out accuracy by at least 20 points greedy, 25 sampled (slow: a few minutes).

The thresholds hold on both machines of this project's kind measured so far: 30.6% -> 75.6% greedy (+45.0) on one,
37.6% -> 63.4% (+25.8; sampled 18.9% -> 51.2%, +32.4) on the other (2026-12-03). CPU kernels move where the
warm-up stops and the RL run follows; the code gives bit-identical runs on one machine (checked against the code
before the option groups over 100 rollout batches).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _fit(tmp_path: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gspo_lightning.cli", "fit", *extra, "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Held-out accuracy on 500 prompts" in result.stdout + result.stderr
    return json.loads((tmp_path / "lightning_logs" / "version_0" / "heldout_report.json").read_text())


README_TABLE = re.compile(r"^greedy +([\d.]+)% +([\d.]+)% +\+([\d.]+)\n^sampled +([\d.]+)% +([\d.]+)%", re.M)


def readme_demo_figures() -> dict[str, float]:
    """The demo's before/after table in README.md, as fractions."""
    found = README_TABLE.search((ROOT / "README.md").read_text())
    assert found, "README.md has no demo table (greedy / sampled before, after, gain)"
    greedy_before, greedy_after, _, sampled_before, sampled_after = (float(v) / 100 for v in found.groups())
    return {"greedy_before": greedy_before, "greedy_after": greedy_after, "sampled_before": sampled_before,
            "sampled_after": sampled_after}  # fmt: skip


def test_demo_gains_20_points(tmp_path):
    report = _fit(tmp_path)
    gain = report["after"]["val/accuracy"] - report["before"]["val/accuracy"]
    sampled_gain = report["after"]["val/accuracy_sampled"] - report["before"]["val/accuracy_sampled"]
    assert gain >= 0.20 and sampled_gain >= 0.25, report
    # the README shows what a fresh clone measures. The warm-up stops at a probe accuracy whose climb CPU kernels
    # move by tens of steps, so two machines of this project's kind started at 30.6% and 37.6%: the README's
    # "before" must be within 10 points of this machine's, and its gain no larger than this run's + 10
    readme = readme_demo_figures()
    before = report["before"]["val/accuracy"]
    assert abs(readme["greedy_before"] - before) <= 0.10, (readme, report)
    assert readme["greedy_after"] - readme["greedy_before"] <= gain + 0.10, (readme, report)


def test_demo_runs_with_the_grpo_preset(tmp_path):
    grpo = ROOT / "configs" / "algorithms" / "grpo.yaml"
    report = _fit(
        tmp_path, "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(grpo), "--trainer.max_steps", "400"
    )
    assert report["optimizer_steps"] == 400
    assert report["after"]["val/accuracy"] >= report["before"]["val/accuracy"] - 0.05, report


def test_demo_gains_20_points_with_rollout_routing_replay(tmp_path):
    # R3: every trainer forward routes as the engine did (the embedded engine: the policy itself); measured
    # 37.6% -> 67.6% greedy (+30.0), sampled +34.2 on the second machine of the module docstring
    recipe = ROOT / "configs" / "recipes" / "gspo_r3.yaml"
    report = _fit(tmp_path, "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(recipe))
    gain = report["after"]["val/accuracy"] - report["before"]["val/accuracy"]
    sampled_gain = report["after"]["val/accuracy_sampled"] - report["before"]["val/accuracy_sampled"]
    assert gain >= 0.20 and sampled_gain >= 0.25, report


def test_demo_learns_with_the_grpo_r3_recipe(tmp_path):
    # GRPO + R3 + token TIS, 200 rollout batches: measured greedy 29.2% -> 55.4% (+26.2), sampled +18.3
    recipe = ROOT / "configs" / "recipes" / "grpo_r3_token_tis.yaml"
    demo = ROOT / "configs" / "demo.yaml"
    report = _fit(tmp_path, "--config", str(demo), "--config", str(recipe), "--trainer.max_steps", "800")
    assert report["optimizer_steps"] == 800
    assert report["after"]["val/accuracy"] - report["before"]["val/accuracy"] >= 0.15, report


def test_demo_learns_with_one_step_stale_rollouts(tmp_path):
    # data.max_staleness 1 (asynchronous rollouts, the trainer's pi_old), 200 rollout batches: measured greedy
    # 30.6% -> 55% (+24) at 200 batches, 73.4% (+42.8) after the whole demo (synchronous: 75.6%, benchmarks/RESULTS.md)
    report = _fit(tmp_path, "--config", str(ROOT / "configs" / "demo.yaml"), "--data.max_staleness", "1",
                  "--trainer.max_steps", "800")  # fmt: skip
    assert report["optimizer_steps"] == 800
    assert report["after"]["val/accuracy"] - report["before"]["val/accuracy"] >= 0.15, report


def test_demo_learns_with_lora(tmp_path):
    # configs/lora.yaml on the demo (lr 1e-3): measured greedy 30.6% -> 75.6% (+45.0), sampled +30.2; at lr 2e-3 it
    # collapsed to 0% after ~500 rollout batches in a fresh environment (transformers 5.24), which this test caught
    lora = ROOT / "configs" / "lora.yaml"
    report = _fit(tmp_path, "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(lora))
    assert report["after"]["val/accuracy"] - report["before"]["val/accuracy"] >= 0.15, report


@pytest.mark.parametrize(
    ("preset", "measured"),
    [
        ("sapo", "30.6% -> 63.6% greedy (+33.0), sampled +34.9"),
        ("cispo", "30.6% -> 73.0% greedy (+42.4), sampled +43.9"),
    ],
)
def test_demo_gains_25_points_with_the_2025_objectives(tmp_path, preset, measured):
    # the whole demo with SAPO's soft gate and with CISPO's clipped IS weight in place of GSPO's clip, measured on
    # this project's 2-core machine (2026-12-07, the machine whose warm-up stops at 30.6%): ``measured``. Learning is
    # the sampled held-out gain, the distribution RL trains (>= 25 points); greedy must gain >= 20: on the machine
    # whose warm-up stops at 37.6% GSPO's greedy gain was 19 points below this machine's, its sampled gain 13
    config = ROOT / "configs" / "algorithms" / f"{preset}.yaml"
    report = _fit(tmp_path, "--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(config))
    gain = report["after"]["val/accuracy"] - report["before"]["val/accuracy"]
    sampled_gain = report["after"]["val/accuracy_sampled"] - report["before"]["val/accuracy_sampled"]
    assert sampled_gain >= 0.25 and gain >= 0.20, (measured, report)


def test_the_tool_demo_gains_20_points_in_10_minutes(tmp_path):
    """configs/tool_demo.yaml: warm-up traces call the multiply tool a quarter of the time; RL must make the model
    use it (multi-turn trajectories, tool tokens masked) and gain >= 20 points greedy and sampled within 10 minutes."""
    import time

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # build (and warm up) the model first, so the timing below is the RL run's
    from gspo_lightning.demo.model import prepare_builtin

    prepare_builtin("tiny-qwen3-moe-calculator")
    config = ROOT / "configs" / "tool_demo.yaml"
    cmd = [sys.executable, "-m", "gspo_lightning.cli", "fit", "--config", str(config), "--trainer.enable_progress_bar",
           "false"]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((tmp_path / "lightning_logs" / "version_0" / "heldout_report.json").read_text())
    gain = report["after"]["val/accuracy"] - report["before"]["val/accuracy"]
    sampled_gain = report["after"]["val/accuracy_sampled"] - report["before"]["val/accuracy_sampled"]
    assert gain >= 0.20 and sampled_gain >= 0.20, report
    assert elapsed <= 600, f"the tool demo took {elapsed:.0f} s"
