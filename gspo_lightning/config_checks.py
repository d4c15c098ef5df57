"""Checks of a parsed CLI configuration that run before anything is built, each failing with one line.

- options from before the option groups (``model.mini_batches``) name their new path (``model.update.mini_batches``);
- a config naming ``VLLMEngine`` without vLLM installed names the install and the switch;
- Lightning Trainer options that overlap the module's own (gradient clipping, accumulation, epochs) are refused,
  naming the option of ours that does the job.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields

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
