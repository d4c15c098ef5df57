"""The package's shape: stages import only from stages before them, and no module-level import cycle exists.

Data flows one way (prompts -> engine -> rewards -> batch -> pre-update pass -> update -> weights back to the
engine); each top-level part of the package sits at one layer and may import from its own layer or lower.
Imports inside functions (lazy imports of heavy or optional packages) are checked for layering too.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "gspo_lightning"

# lower layers first; a part may import from its own layer and every layer before it
LAYERS = [
    # shared types and model-agnostic helpers
    {"ops", "registry", "batch", "sharding", "rng"},
    {"components", "moe", "data"},  # loss components, MoE plumbing, prompt sources
    {"demo"},  # the built-in demo model (built from the built-in task)
    {"models", "adapters"},  # from_pretrained loading (resolves built-in names), peft adapters on a model
    {"engines", "rewards", "agents"},  # the data side's stages after the prompts; multi-turn trajectories
    {"rollout"},  # prompts -> engine -> rewards -> RolloutBatch, held-out evaluation, the data module, the seam
    {"training"},  # the trainer side's stages
    {"module"},
    {"callbacks"},
    {"checkpoints"},  # checkpoint files, for the CLI
    {"plan"},  # the memory planner (reads configurations and model configs, loads nothing), for the CLI
    {"config_checks"},  # checks of a parsed CLI configuration, before anything is built
    {"cli", "__init__"},
]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """``gspo_lightning.training.update`` -> ``training``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gspo_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("gspo_lightning"))
    return found


MODULES = _modules()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_upward_import(name):
    part = _part(name)
    assert part in LAYER, f"{name}: add its part {part!r} to LAYERS in this test"
    upward = [m for m in _imports(MODULES[name], False) if LAYER.get(_part(m), -1) > LAYER[part]]
    assert not upward, f"{name} (layer of {part!r}) imports from a later stage: {upward}"


def test_no_import_cycle():
    graph = {name: {m for m in _imports(path, True) if m in MODULES} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
