"""Checks of a parsed CLI configuration that run before anything is built, each failing with one line.

- options from before the option groups (``model.mini_batches``) name their new path (``model.update.mini_batches``);
- a config naming ``VLLMEngine`` without vLLM installed names the install and the switch;
- Lightning Trainer options that overlap the module's own (gradient clipping, accumulation, epochs) are refused,
  naming the option of ours that does the job;
- a rollout batch too small for its mini-batches is refused before a model loads;
- a ``--config`` file that is not valid YAML is named, with the line and column of the problem.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

_RENAMED = {
    "model.model": "model.policy.path",
    "data.val_size": "data.heldout.size",
    "data.val_num_samples": "data.heldout.num_samples",
    "data.val_batch_size": "data.heldout.batch_size",
}
"""Old options whose name changed too, not only their place (the others keep their name inside a group)."""


def moved_options() -> dict[str, str]:
    """Every flat option of the module and the data module before they were grouped -> its path now
    (``model.mini_batches`` -> ``model.update.mini_batches``), read off the option groups themselves."""
    from gspo_lightning.rollout.options import EncodingOptions, HeldOutOptions, RolloutOptions
    from gspo_lightning.training.options import ModuleOptions

    groups = {f"model.{f.name}": f.default_factory for f in fields(ModuleOptions)}
    groups.update({"data.rollout": RolloutOptions, "data.encoding": EncodingOptions, "data.heldout": HeldOutOptions})
    paths = [(group, f.name) for group, cls in groups.items() for f in fields(cls)]
    renamed = set(_RENAMED.values())
    moved = {f"{g.split('.')[0]}.{name}": f"{g}.{name}" for g, name in paths if f"{g}.{name}" not in renamed}
    return {**moved, **_RENAMED}


_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
_NOT_ACCEPTED = re.compile(r"Group '(?:\w+\.)?(model|data)' does not accept (?:nested key|option) '([\w.]+)'")


def moved_option_message(message: str) -> str | None:
    """One line naming the new path of an old flat option in a parse error (command line or YAML), else None."""
    moved, names = moved_options(), []
    found = _UNRECOGNIZED.search(message)
    if found:
        names = [a.removeprefix("--").split("=")[0] for a in found.group(1).split() if a.startswith("--")]
    for group, key in _NOT_ACCEPTED.findall(message):
        names.append(f"{group}.{key}")
    hits = [(n, moved[n]) for n in names if n in moved]
    if not hits:
        return None
    renames = "; ".join(f"{old} is now {new}" for old, new in hits)
    return f"{renames} (the options are grouped: `gspo-lightning fit --help` lists them)."


def check_engine_installed(config) -> None:
    """Exit with one line, before anything loads, when the config names ``VLLMEngine`` and vLLM is missing."""
    engine = config.get("data", {}).get("engine") if hasattr(config, "get") else None
    class_path = engine.get("class_path", "") if hasattr(engine, "get") else str(engine or "")
    if class_path.rsplit(".", 1)[-1] != "VLLMEngine":
        return
    from gspo_lightning.engines.vllm_engine import INSTALL_HINT, SWITCH_HINT, vllm_installed

    if not vllm_installed():
        sys.stderr.write(f"error: data.engine is VLLMEngine, but vLLM is not installed. {INSTALL_HINT} {SWITCH_HINT}\n")
        sys.exit(2)


OVERLAPPING_TRAINER_OPTIONS = {
    "gradient_clip_val": "GSPOModule clips gradients itself after every micro-batch's accumulation: set"
    " model.update.max_grad_norm (null: no clipping)",
    "gradient_clip_algorithm": "GSPOModule clips by global norm: set model.update.max_grad_norm",
    "accumulate_grad_batches": "a rollout batch's optimizer steps accumulate their micro-batches already: set"
    " model.batching.micro_batch_size or model.batching.micro_batch_tokens (the gradient is the same)",
    "max_epochs": "a rollout stream has no epochs: set trainer.max_steps (optimizer steps); model.update.epochs"
    " is the passes over each rollout batch",
}
"""Trainer options that would fight the module's own, with what to set instead."""

_TRAINER_DEFAULTS = {"gradient_clip_val": None, "gradient_clip_algorithm": None, "accumulate_grad_batches": 1,
                     "max_epochs": (None, -1)}  # fmt: skip


def check_trainer_overlaps(config) -> None:
    """Exit with one line when a Trainer option that GSPOModule does its own way is set.

    Raises:
        SystemExit: ``trainer.gradient_clip_val`` (or ``gradient_clip_algorithm``), ``accumulate_grad_batches``
            other than 1, or ``max_epochs``.
    """
    trainer = config.get("trainer") if hasattr(config, "get") else None
    if trainer is None:
        return
    for name, instead in OVERLAPPING_TRAINER_OPTIONS.items():
        value, default = trainer.get(name), _TRAINER_DEFAULTS[name]
        if value not in (default if isinstance(default, tuple) else (default,)):
            sys.stderr.write(f"error: trainer.{name}={value}: {instead}.\n")
            sys.exit(2)


def _world(trainer) -> int | None:
    """Data-parallel ranks when ``trainer.devices`` and ``num_nodes`` say it plainly (an int or a list), else None."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if devices in (None, "auto", -1, "-1"):  # what Lightning picks: every GPU, or the one CPU process
        import torch

        on_cpu = str(trainer.get("accelerator")) == "cpu" or not torch.cuda.is_available()
        devices = 1 if on_cpu else torch.cuda.device_count()
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    return devices * int(nodes) if isinstance(devices, int) and devices > 0 else None


def check_batch_shape(config) -> None:
    """Exit with one line when a rank's rollout batch has fewer sequences than ``model.update.mini_batches``
    (``prompts_per_step / ranks x num_samples``), before any model loads or evaluation runs."""
    get = lambda c, k: c.get(k) if hasattr(c, "get") else None  # noqa: E731
    trainer, model, data = get(config, "trainer") or {}, get(config, "model") or {}, get(config, "data") or {}
    rollout, update = get(data, "rollout") or {}, get(model, "update") or {}
    world = _world(trainer)
    per_step, samples, minis = (
        get(rollout, "prompts_per_step"),
        get(rollout, "num_samples"),
        get(update, "mini_batches"),
    )
    if world is None or not all(isinstance(v, int) for v in (per_step, samples, minis)):
        return
    sequences = per_step // world * samples
    if sequences < minis:
        sys.stderr.write(
            f"error: a rank's rollout batch holds {sequences} sequences (data.rollout.prompts_per_step={per_step}"
            f" over {world} rank(s) x num_samples={samples}), fewer than model.update.mini_batches={minis}: lower"
            " model.update.mini_batches or raise data.rollout.prompts_per_step / num_samples.\n"
        )
        sys.exit(2)


def config_files(argv: Sequence[str]) -> list[str]:
    """The ``--config`` / ``-c`` files of a command line, in order."""
    files, args = [], list(argv)
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def yaml_error_message(message: str, argv: Sequence[str] | None = None) -> str | None:
    """One line naming the ``--config`` file behind jsonargparse's "Problems parsing config" (which names none),
    with the YAML problem and where it is; None for other errors or when every file reads."""
    if "Problems parsing config" not in message:
        return None
    import yaml

    for name in config_files(sys.argv[1:] if argv is None else argv):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"--config {name}: not valid YAML: {problem}{where}."
    return None
