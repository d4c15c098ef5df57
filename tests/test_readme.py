"""The README's code runs as written."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from support import ROOT, tiny_args

from gspo_lightning.cli import DEMO_CONFIG, cli_main

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _block(lang: str, startswith: str = "", contains: str = "") -> str:
    matches = [code for kind, code in BLOCKS if kind == lang and code.startswith(startswith) and contains in code]
    assert matches, f"no {lang} block starting with {startswith!r} containing {contains!r} in README.md"
    return matches[0]


def test_compose_example_runs():
    result = subprocess.run([sys.executable, "-c", _block("python", "import torch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "policy/ratio_mean" in result.stdout


def test_custom_component_example_runs_from_yaml(tmp_path, monkeypatch):
    (tmp_path / "my_components.py").write_text(_block("python", "# my_components.py"))
    config = tmp_path / "custom.yaml"
    config.write_text(_block("yaml", "model:", contains="ClampedTokenRatio"))
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(config)], run=False)
    objective = cli.model.objective
    assert type(objective.ratio).__name__ == "ClampedTokenRatio" and objective.ratio.max_log == 0.3
    assert objective.clip.eps_high == 0.28
    lp = torch.zeros(2, 3, requires_grad=True)
    out = objective(lp, torch.full((2, 3), -1.0), torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool))
    out.loss.backward()
    # the clamp at 0.3 makes every ratio exp(0.3) = 1.3499
    assert abs(out.metrics["policy/ratio_max"].item() - 1.3499) < 1e-3
    assert torch.isfinite(lp.grad).all()


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    command = _block("bash", "python -m pip install", contains="pytest").strip()
    assert command in ci.splitlines()


def test_readme_run_command_runs_the_demo(tmp_path):
    command = _block("bash", "python -m pip install", contains="gspo-lightning fit").strip()
    install, run = command.split(" && ")
    assert install.startswith("python -m pip install") and " -e ." in install
    # the README's run command as a user types it, shrunk to a tiny model and two optimizer steps
    shrink = tiny_args(tmp_path, max_steps=2)[2:]  # everything but --config: the command must default to the demo
    exe = shutil.which(shlex.split(run)[0])
    assert exe is not None, f"{run!r} is not on PATH: the README's install step installs it"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [exe, *shlex.split(run)[1:], *shrink], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Held-out accuracy on" in result.stdout + result.stderr
    assert (tmp_path / "lightning_logs" / "version_0" / "heldout_report.json").exists()


@pytest.mark.parametrize(
    ("module", "option", "value"),
    [
        ("my_env", "--data.environment", "my_env.Calculator"),
        ("my_rollout", "--data.rollout_function", "my_rollout.one_call"),
    ],
    ids=["environment", "rollout-function"],
)
def test_the_agent_examples_train(tmp_path, monkeypatch, module, option, value):
    from support import scalars, tool_args

    (tmp_path / f"{module}.py").write_text(_block("python", f"# {module}.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    args = tool_args(tmp_path / "run", "--data.tools", "null", option, value, "--data.rewards", "[TrajectoryReward]")
    cli = cli_main(["fit", *args, "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    logged = scalars(tmp_path / "run" / "lightning_logs" / "version_0")
    assert "rollout/trajectory_reward_mean" in logged and "rollout/turns_mean" in logged


def test_the_tools_example_is_the_tool_demo_config():
    block = yaml.safe_load(_block("yaml", "data:", contains="tools:"))
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tool_demo.yaml").read_text())
    assert block["data"]["tools"] == config["data"]["tools"]
    assert block["data"]["agent"]["max_turns"] == config["data"]["agent"]["max_turns"]


@pytest.mark.distributed
def test_the_two_node_commands_train_as_written(tmp_path):
    """The README's two-node commands, node0 = this machine and a free port, run as two processes (shortened to two
    rollout batches and 16 held-out prompts): both exit 0 and node 1 joined as the second rank."""
    from support import free_port

    block = _block("bash", contains="NODE_RANK=1")
    lines = [line for line in block.splitlines() if "NODE_RANK=" in line]
    assert len(lines) == 2 and lines[0].replace("NODE_RANK=0", "NODE_RANK=1") == lines[1]
    port, short = str(free_port()), "--trainer.max_steps 8 --data.heldout.size 16 --data.rollout.prompts_per_step 8"
    here = {"node0": "127.0.0.1", "29500": port, "configs/": f"{ROOT}/configs/"}
    commands = []
    for line in lines:
        for old, new in here.items():
            line = line.replace(old, new)
        commands.append(f"{line} {short}")
    run = {"shell": True, "cwd": tmp_path, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    nodes = [subprocess.Popen(command, **run) for command in commands]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "MEMBER: 2/2" in outputs[1] and "`Trainer.fit` stopped: `max_steps=8` reached." in outputs[0]
