"""The loss path is vectorised: no Python loop (or comprehension) in the component and ops modules.

A loop over a handful of components (the token masks of one objective), never over sequences or tokens, says
so on its line: ``# over components, not tokens``."""

import ast
from pathlib import Path

import pytest

import gspo_lightning

PACKAGE = Path(gspo_lightning.__file__).parent
LOSS_PATH = [*sorted((PACKAGE / "components").glob("*.py")), PACKAGE / "ops.py"]
LOOPS = (ast.For, ast.While, ast.AsyncFor, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
OVER_COMPONENTS = "# over components, not tokens"


@pytest.mark.parametrize("path", LOSS_PATH, ids=lambda p: p.name)
def test_no_loops(path):
    text = path.read_text()
    lines = text.splitlines()
    loops = [node for node in ast.walk(ast.parse(text)) if isinstance(node, LOOPS)]
    found = [f"{path.name}:{node.lineno}" for node in loops if not lines[node.lineno - 1].endswith(OVER_COMPONENTS)]
    assert not found, f"Python loops in the loss path: {found}"


def test_the_check_sees_loops(tmp_path):
    tree = ast.parse("for i in range(3):\n    pass\n")
    assert any(isinstance(node, LOOPS) for node in ast.walk(tree))
