"""``gspo-lightning plan`` on every shipped config, offline: it reads what fit reads and prints the table."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gspo_lightning.cli import CONFIG_DIR, DEMO_CONFIG, main
from gspo_lightning.plan.report import NOT_MODELLED

TOP_LEVEL = sorted(p for p in CONFIG_DIR.glob("*.yaml") if "model:\n  policy:\n" in p.read_text())
assert len(TOP_LEVEL) >= 3, "no run config found: the selection above no longer matches the shipped configs"
OVERLAYS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p not in TOP_LEVEL)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No network (the planner reads carried numbers), and no stray pytest arguments for LightningCLI."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


def plan(capsys, *args: str, status: int = 0) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    captured = capsys.readouterr()
    assert (exit_info.value.code or 0) == status, captured.err
    return captured.out


def plan_error(*args: str) -> str:
    """The one-line message ``plan`` exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", *args])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def assert_table(out: str) -> None:
    """The shape a person reads: a header, one line per term with both phases, totals, the verdict lines."""
    lines = out.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("model: ")) :]  # past library notices
    assert lines[0].startswith("model: ") and lines[1].startswith("run: ") and lines[2].startswith("batch per rank")
    head = next(i for i, line in enumerate(lines) if line.startswith("per device ("))
    total = next(i for i, line in enumerate(lines) if line.startswith("total "))
    rows = lines[head + 1 : total]
    assert {"policy weights", "gradients", "optimizer states", "activations"} <= {r[:24].strip() for r in rows}
    for row in [*rows, lines[total]]:
        assert re.search(r"\s\d+\.\d\d\s+\d+\.\d\d(\s|$)", row), row  # generation and update columns
    assert re.search(r"^device memory .*: (fits|DOES NOT FIT); peak phase: (generation|update) at", out, re.M)
    assert re.search(r"^dominant term: .+ in the (generation|update)\)$", out, re.M)


@pytest.mark.parametrize("path", TOP_LEVEL, ids=lambda p: p.name)
def test_plan_runs_on_every_shipped_run_config(path, capsys):
    assert_table(plan(capsys, "--config", str(path), "--device_memory", "80GB"))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_plan_runs_on_every_overlay_stacked_on_the_demo(path, capsys):
    out = plan(capsys, "--config", str(DEMO_CONFIG), "--config", str(path))
    assert_table(out)
    if path.name == "lora.yaml":
        assert re.search(r"^model: .*LoRA", out, re.M)
    if "deepspeed" in path.name or "fsdp" in path.name:
        assert re.search(r"^run: .*(FSDP|DeepSpeed)", out, re.M)


def test_the_demo_without_config_and_an_override_as_for_fit(capsys):
    small = plan(capsys, "--model.batching.micro_batch_size", "8")
    default = plan(capsys)
    assert "builtin:tiny-qwen3-moe-addition" in default
    activations = [float(line.split()[2]) for line in (small, default) for line in line.splitlines()
                   if line.startswith("activations ")]  # fmt: skip
    assert activations[0] < activations[1]


def test_a_run_that_does_not_fit_names_the_dominant_term_and_a_knob_and_exits_3(capsys):
    out = plan(capsys, "--device_memory", "100MiB", status=3)  # a launch script can test it
    assert "DOES NOT FIT" in out
    assert re.search(r"^knob: .*--(model|data)\.\S+ \S+", out, re.M), out
    assert_table(out)  # the whole report is printed first
    assert NOT_MODELLED in out


@pytest.mark.parametrize("size", ["0.5B", "infGiB", "nanGiB"])
def test_a_device_memory_that_is_not_a_size_is_one_line(size):
    message = plan_error("--device_memory", size)
    assert f"--device_memory {size!r}" in message and "e.g. 80GiB" in message


def test_a_strategy_fit_refuses_is_refused_with_the_valid_names():
    message = plan_error("--trainer.strategy", "fsdp3")
    assert "trainer.strategy='fsdp3'" in message and "ddp_find_unused_parameters_true" in message


@pytest.mark.parametrize("strategy", ["ddp", "ddp_find_unused_parameters_true", "fsdp", "deepspeed_stage_3"])
def test_registered_strategy_names_still_plan(strategy, capsys):
    assert_table(plan(capsys, "--trainer.strategy", strategy, "--trainer.devices", "2"))


def test_the_30b_config_on_its_stated_hardware_names_what_dominates(capsys):
    out = plan(capsys, "--config", str(CONFIG_DIR / "qwen3_30b_a3b.yaml"), "--device_memory", "80GB")
    assert "30.53B params" in out and "FSDP2 over 8" in out and "vLLM reservation" in out


def test_bad_device_memory_is_one_error_line():
    result = subprocess.run(
        [sys.executable, "-m", "gspo_lightning.cli", "plan", "--device_memory", "80"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "--device_memory '80': give a finite size of at least 1 byte with a unit, e.g. 80GiB" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error")]) == 1


def test_help_lists_plan(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"^ +plan +\S", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("name", ["qwen3_0.6b_math.yaml", "qwen3_30b_a3b.yaml"])
def test_the_readme_shows_the_current_plan_of_each_gpu_config(name, capsys):
    doc = (Path(__file__).parents[2] / "docs" / "planning.md").read_text()
    section = doc[doc.index("## Will it fit?") :]
    end = section.find("\n## ", 1)  # the section runs to the next heading, or to the end of the page
    blocks = re.findall(r"```text\n(.*?)```", section if end < 0 else section[:end], flags=re.S)
    out = plan(capsys, "--config", str(CONFIG_DIR / name), "--device_memory", "80GB")
    assert out in blocks, f"docs/planning.md's plan of {name} is stale: paste the output of gspo-lightning plan again"
