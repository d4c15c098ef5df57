"""``gspo-lightning list``: a LightningCLI subcommand that prints the registries and builds nothing."""

import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from gspo_lightning.cli import GSPOLightningCLI, cli_main, list_components, main, registries


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    """No stray pytest arguments for LightningCLI to warn about; main() rewrites sys.argv, undone after each test."""
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


def exit_code_and_stdout(capsys, call: Callable[[], object]) -> tuple[object, str]:
    """Run ``call``, which must exit, and return its exit code and what it printed."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    return exit_info.value.code, capsys.readouterr().out


def test_list_all_kinds_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "gspo_lightning.cli", "list"], capture_output=True, text=True, check=True
    )
    for name in ("SequenceRatio", "GroupNormAdvantage", "PPOClip", "K3KL"):
        assert name in out.stdout
    assert "arXiv 2507.18071" in out.stdout


def test_list_shows_the_2025_objectives_with_their_papers():
    clips, masks = list_components(["clip"]), list_components(["token_mask"])
    for name, paper in (("SAPOGate", "2511.20347"), ("CISPOClip", "2506.13585"), ("GMPOClip", "2507.20673")):
        assert re.search(rf"^  {name} +.*arXiv {paper}", clips, re.M), clips
    for name, paper in (
        ("OffPolicySequenceMask", "2512.02556"),
        ("DivergenceMask", "2602.04879"),
        ("HighEntropyTokens", "2506.01939"),
        ("ClipCov", "2505.22617"),
        ("KLCov", "2505.22617"),
    ):
        assert re.search(rf"^  {name} +.*arXiv {paper}", masks, re.M), masks


def test_list_one_kind_and_unknown_kind():
    text = list_components(["clip"])
    assert "DualClip" in text and "SequenceRatio" not in text
    with pytest.raises(SystemExit, match="unknown kind 'ratios'"):
        list_components(["ratios"])


def test_help_shows_list_next_to_the_trainer_subcommands(capsys):
    code, out = exit_code_and_stdout(capsys, lambda: main(["--help"]))
    assert code == 0
    for subcommand in ("fit", "validate", "list"):
        assert re.search(rf"^ +{subcommand} +\S", out, re.MULTILINE), f"{subcommand} missing from --help:\n{out}"
    code, out = exit_code_and_stdout(capsys, lambda: main(["list", "--help"]))
    assert code == 0 and "list [KIND ...]" in out
    assert all(kind in out for kind in registries())


def test_list_one_kind_through_the_parser(capsys):
    code, out = exit_code_and_stdout(capsys, lambda: cli_main(["list", "ratio"]))
    assert code == 0
    assert out == list_components(["ratio"]) + "\n"
    assert [line for line in out.splitlines() if not line.startswith(" ")] == ["ratio:"]
    assert "SequenceRatio" in out and "PPOClip" not in out


def test_unknown_kind_is_one_error_line_naming_the_kinds(capsys):
    code, _ = exit_code_and_stdout(capsys, lambda: cli_main(["list", "ratios"]))
    message = str(code)  # SystemExit(message): Python prints it to stderr and exits with status 1
    assert code not in (0, None) and "\n" not in message
    assert "unknown kind 'ratios'" in message and all(kind in message for kind in registries())


def test_list_instantiates_nothing(capsys, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("GSPO_LIGHTNING_CACHE", str(cache))

    def instantiate_classes(self):
        raise AssertionError("list must not build the model, data module or trainer")

    monkeypatch.setattr(GSPOLightningCLI, "instantiate_classes", instantiate_classes)
    code, out = exit_code_and_stdout(capsys, lambda: cli_main(["list"]))
    assert code == 0 and out == list_components() + "\n"
    assert not any(cache.iterdir()), "list built a demo model"
