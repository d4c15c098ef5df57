"""Two-process DDP on CPU (gloo): it trains, and splitting a rollout batch over ranks keeps the gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_cli_fit import tiny_args

HERE = Path(__file__).parent
pytestmark = pytest.mark.distributed


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_split_over_two_ranks_gives_the_single_process_gradient(tmp_path, tiny_path):
    script = str(HERE / "ddp_grad_script.py")
    _run([sys.executable, script, str(tmp_path / "one.pt"), "1"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "two.pt"), "2"], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    total = sum(float(g.abs().sum()) for g in one.values())
    assert total > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ddp_fit_through_the_cli(tmp_path, tiny_path):
    args = tiny_args(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true")
    _run([sys.executable, "-m", "gspo_lightning.cli", "fit", *args], tmp_path)
    ckpt = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
