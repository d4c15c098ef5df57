"""The README's code runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser

from gspo_lightning import PolicyObjective

README = (Path(__file__).parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def _block(lang: str, startswith: str = "") -> str:
    matches = [code for kind, code in BLOCKS if kind == lang and code.startswith(startswith)]
    assert matches, f"no {lang} block starting with {startswith!r} in README.md"
    return matches[0]


def test_compose_example_runs():
    result = subprocess.run([sys.executable, "-c", _block("python", "import torch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "policy/ratio_mean" in result.stdout


def test_custom_component_example_runs_from_yaml(tmp_path, monkeypatch):
    (tmp_path / "my_components.py").write_text(_block("python", "# my_components.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PolicyObjective, "objective")
    cfg = parser.parse_string(_block("yaml", "objective:"))
    objective = parser.instantiate_classes(cfg).objective
    assert type(objective.ratio).__name__ == "ClampedTokenRatio" and objective.ratio.max_log == 0.3
    assert objective.clip.eps_high == 0.28
    import torch

    lp = torch.zeros(2, 3, requires_grad=True)
    out = objective(lp, torch.full((2, 3), -1.0), torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool))
    out.loss.backward()
    # the clamp at 0.3 makes every ratio exp(0.3): all tokens of the positive-advantage row clip high
    assert abs(out.metrics["policy/ratio_max"].item() - 1.3499) < 1e-3
    assert yaml.safe_load(_block("yaml", "objective:"))["objective"]["ratio"]["init_args"]["max_log"] == 0.3


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    command = _block("bash", "python -m pip install").strip()
    assert command in ci
