"""Without a terminal (nohup, SLURM, CI logs) a run prints plain progress lines instead of a bar's redraws."""

import os
import re
import subprocess
import sys

from support import ROOT, tiny_args

from gspo_lightning.callbacks.progress import StepLineProgress
from gspo_lightning.cli import cli_main


def test_a_run_with_redirected_output_prints_progress_lines(tmp_path):
    args = tiny_args(tmp_path, "--trainer.enable_progress_bar", "true", max_steps=6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "gspo_lightning.cli", "fit", *args], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    # the first rollout batch and the last step always print; each line has the step, reward, rate and ETA
    assert lines[0].startswith("step 2/6 (33.3%) | reward ") and lines[-1].startswith("step 6/6 (100.0%)"), lines
    assert all(re.search(r"s/rollout [\d.]+ \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$", line) for line in lines)
    assert any(line.startswith("held-out evaluation | step 4/6 (66.7%)") for line in done.stdout.splitlines())


def test_the_line_progress_replaces_lightnings_bar_without_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr("gspo_lightning.callbacks.progress.interactive", lambda: False)
    cli = cli_main(["fit", *tiny_args(tmp_path, "--trainer.enable_progress_bar", "true"), "--trainer.max_steps", "2"])
    assert type(cli.trainer.progress_bar_callback) is StepLineProgress
