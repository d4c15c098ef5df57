"""``gspo-lightning list`` from the command line."""

import subprocess
import sys

import pytest

from gspo_lightning.cli import list_components


def test_list_all_kinds_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "gspo_lightning.cli", "list"], capture_output=True, text=True, check=True
    )
    for name in ("SequenceRatio", "GroupNormAdvantage", "PPOClip", "K3KL"):
        assert name in out.stdout
    assert "arXiv 2507.18071" in out.stdout


def test_list_one_kind_and_unknown_kind():
    text = list_components(["clip"])
    assert "DualClip" in text and "SequenceRatio" not in text
    with pytest.raises(SystemExit, match="unknown kind 'ratios'"):
        list_components(["ratios"])
