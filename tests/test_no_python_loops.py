"""The loss path is vectorised: no Python loop (or comprehension) in the component and ops modules."""

import ast
from pathlib import Path

import pytest

import gspo_lightning

PACKAGE = Path(gspo_lightning.__file__).parent
LOSS_PATH = [*sorted((PACKAGE / "components").glob("*.py")), PACKAGE / "ops.py"]
LOOPS = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@pytest.mark.parametrize("path", LOSS_PATH, ids=lambda p: p.name)
def test_no_loops(path):
    tree = ast.parse(path.read_text())
    found = [f"{path.name}:{node.lineno}" for node in ast.walk(tree) if isinstance(node, LOOPS)]
    assert not found, f"Python loops in the loss path: {found}"


def test_the_check_sees_loops(tmp_path):
    tree = ast.parse("for i in range(3):\n    pass\n")
    assert any(isinstance(node, LOOPS) for node in ast.walk(tree))
