"""The option groups: their size, descriptions, docs, one owner per decision, and old flat options refused by name."""

import ast
import inspect
import re
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from docstring_parser import parse

from gspo_lightning.cli import CONFIG_DIR, cli_main
from gspo_lightning.config_checks import moved_options
from gspo_lightning.module import GSPOModule
from gspo_lightning.plan.run import run_spec
from gspo_lightning.rollout import EncodingOptions, HeldOutOptions, RolloutDataModule, RolloutOptions
from gspo_lightning.training.options import ModuleOptions

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "gspo_lightning"
MODULE_GROUPS = {f"model.{f.name}": f.default_factory for f in fields(ModuleOptions)}
DATA_GROUPS = {"data.rollout": RolloutOptions, "data.encoding": EncodingOptions, "data.heldout": HeldOutOptions}
GROUPS = {**MODULE_GROUPS, **DATA_GROUPS}
RUN_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml"))


@pytest.mark.parametrize("cls", [GSPOModule, RolloutDataModule], ids=lambda c: c.__name__)
def test_each_lightning_class_takes_at_most_15_arguments(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert len(params) <= 15, params


@pytest.mark.parametrize("cls", [GSPOModule, RolloutDataModule], ids=lambda c: c.__name__)
def test_every_argument_has_a_description(cls):
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    described = {p.arg_name for p in parse(cls.__doc__).params}
    assert not set(params) - described


@pytest.mark.parametrize("path", sorted(GROUPS), ids=str)
def test_every_option_has_a_one_line_description(path):
    """jsonargparse shows a dataclass field's description from the group's ``Attributes:``."""
    cls = GROUPS[path]
    described = {p.arg_name: p.description for p in parse(cls.__doc__).params}
    for f in fields(cls):
        assert described.get(f.name), f"{path}.{f.name} has no description in {cls.__name__}'s docstring"


def test_help_shows_the_descriptions(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model.update.mini_batches MINI_BATCHES optimizer steps per rollout batch and epoch." in out
    assert "--data.heldout.size SIZE evaluate at most this many held-out prompts" in out


def _default(f):
    value = f.default if f.default is not MISSING else f.default_factory()
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip().strip("'")


@pytest.mark.parametrize("path", sorted(GROUPS), ids=str)
def test_the_training_doc_lists_every_option_with_its_default(path):
    """docs/training.md's tables: a row per option, with the default the code has."""
    doc = (ROOT / "docs" / "training.md").read_text()
    section = doc[doc.index(f"`{path}`:") :]
    section = section[: section.index("\n\n", section.index("| --- |"))]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, flags=re.M))
    for f in fields(GROUPS[path]):
        assert f.name in rows, f"docs/training.md: no row for {path}.{f.name}"
        assert rows[f.name] == _default(f), f"docs/training.md: {path}.{f.name} defaults to {_default(f)}"


@pytest.mark.parametrize(
    ("args", "old", "new"),
    [
        (["--model.mini_batches", "2"], "model.mini_batches", "model.update.mini_batches"),
        (["--model.model", "builtin:tiny-qwen3-moe-random"], "model.model", "model.policy.path"),
        (["--data.val_size=3"], "data.val_size", "data.heldout.size"),
        (["--data.prompts_per_step", "4"], "data.prompts_per_step", "data.rollout.prompts_per_step"),
    ],
)
def test_an_old_flat_option_on_the_command_line_names_its_new_path(capsys, args, old, new):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {old} is now {new}"), err


@pytest.mark.parametrize(
    ("text", "old", "new"),
    [
        ("model:\n  micro_batch_tokens: 4096\n", "model.micro_batch_tokens", "model.batching.micro_batch_tokens"),
        ("data:\n  val_num_samples: 2\n", "data.val_num_samples", "data.heldout.num_samples"),
        ("model:\n  routing_replay: rollout\n", "model.routing_replay", "model.moe.routing_replay"),
    ],
)
def test_an_old_flat_option_in_yaml_names_its_new_path(tmp_path, capsys, text, old, new):
    config = tmp_path / "old.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 2
    assert f"error: {old} is now {new}" in capsys.readouterr().err


def test_every_moved_option_names_a_real_option():
    paths = {f"{group}.{f.name}" for group, cls in GROUPS.items() for f in fields(cls)}
    moved = moved_options()
    assert set(moved.values()) <= paths and len(moved) == len(paths)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_the_planner_reads_the_options_the_module_gets(path):
    """One owner per default and decision: the planner builds the module's own groups from the configuration."""
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    cli = cli_main(["--config", str(path), *cpu, "--data.engine", "TransformersEngine"], run=False)
    config = cli.config.as_dict()
    assert ModuleOptions.from_config(config["model"]) == cli.model.options
    spec = run_spec(config)
    module = cli.model
    assert spec.mini_batches == module.options.update.mini_batches
    assert spec.records_routing == module.options.moe.holds_routing_records(module.options.update.on_policy)
    assert spec.prompts_per_step == cli.datamodule.rollout.prompts_per_step


def _source_files():
    return [p for p in ROOT.rglob("*.py") if ".git" not in p.parts and "lightning_logs" not in p.parts]


def test_no_python_file_is_over_400_lines_and_the_module_under_300():
    long = {str(p.relative_to(ROOT)): n for p in _source_files() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
    assert len((PACKAGE / "module.py").read_text().splitlines()) < 300


def test_the_data_side_never_reads_the_trainers_module():
    """The policy crosses once, as a PolicyLink: nothing in the rollout package reaches for the LightningModule."""
    for path in (PACKAGE / "rollout").rglob("*.py"):
        names = {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
        assert "lightning_module" not in names, path


def test_the_trainer_side_reaches_the_data_side_only_through_the_seam():
    import lightning.pytorch as pl

    from gspo_lightning.rollout import RolloutSide, rollout_side

    assert issubclass(RolloutDataModule, RolloutSide)
    other = SimpleNamespace(datamodule=pl.LightningDataModule())  # a data module without connect / sync_weights
    with pytest.raises(RuntimeError, match="needs a RolloutDataModule"):
        rollout_side(other)


def test_the_groups_are_the_modules_argument_types():
    hints = typing.get_type_hints(GSPOModule.__init__)
    assert {f"model.{name}": hints[name] for name in (f.name for f in fields(ModuleOptions))} == MODULE_GROUPS
    hints = typing.get_type_hints(RolloutDataModule.__init__)
    assert {f"data.{name}": hints[name] for name in ("rollout", "encoding", "heldout")} == DATA_GROUPS
