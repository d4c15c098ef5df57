"""Lightning checkpoints under ``model.peft``: the adapters (and ``modules_to_save`` copies), not the frozen base.

A LoRA checkpoint of the whole module would hold every base weight (61 GB for Qwen3-30B-A3B in bf16) next to a
few MB of adapters. :func:`save_adapters_only` (the module's ``on_save_checkpoint``) leaves the frozen parameters
out of ``checkpoint["state_dict"]``; the optimizer state is the adapters' already (only trainable parameters are
optimised, keyed by their index). :func:`load_adapters_only` (``on_load_checkpoint``) checks the checkpoint's
tensors against the configured adapters and puts the module's own frozen tensors, loaded from
``model.policy.path``, in place of the missing ones, so Lightning's strict load still checks every key and copies
nothing onto them (a copy of a tensor onto itself is skipped).

Only under strategies that write ``checkpoint["state_dict"]`` as given and load it after ``on_load_checkpoint``
(Lightning's single-device and DDP ones): FSDP, FSDP2 (``ModelParallelStrategy``) and DeepSpeed save the model
their own way and load it before that hook, so their checkpoints keep the whole model, as before.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from gspo_lightning.adapters import is_peft

ADAPTERS_KEY = "gspo_adapters"
"""``checkpoint[ADAPTERS_KEY]``: ``{"peft": the peft config in words, "adapters_only": bool}`` (under peft)."""

_BOOKKEEPING = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}


def save_adapters_only(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Under peft, drop the policy's frozen parameters from ``checkpoint["state_dict"]`` (where the strategy allows,
    :func:`_plain_state_dict`) and record the peft config as ``checkpoint[ADAPTERS_KEY]``."""
    policy = getattr(module, "policy", None)
    if policy is None or not is_peft(policy):
        return
    adapters_only = _plain_state_dict(module) and "state_dict" in checkpoint
    checkpoint[ADAPTERS_KEY] = {"peft": describe_peft(module.peft_config), "adapters_only": adapters_only}
    if adapters_only:
        frozen = _frozen_names(module)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}


def load_adapters_only(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Check the checkpoint's adapters against the configured ones and, for an adapters-only checkpoint, put the
    module's frozen base (from ``model.policy.path``) in place of the tensors it left out.

    Raises:
        ValueError: (one line, naming both peft configs) the checkpoint's adapter tensors are not the configured
            ones (another rank, other targets), or it holds adapters only and this run has no ``model.peft``.
    """
    state, saved = checkpoint.get("state_dict"), checkpoint.get(ADAPTERS_KEY) or {}
    policy = getattr(module, "policy", None)
    if state is None or policy is None or not _plain_state_dict(module):
        return  # the strategy has loaded the model itself (FSDP, FSDP2, DeepSpeed)
    theirs = saved.get("peft", "not recorded: written without model.peft, or by an earlier version")
    if not is_peft(policy):
        if saved:
            raise ValueError(_refusal(module, theirs, "no model.peft", "this run trains the whole model"))
        return
    current = module.state_dict()
    problem = _adapter_mismatch(state, current, set(current) - _frozen_names(module))
    if problem is not None:
        raise ValueError(_refusal(module, theirs, describe_peft(module.peft_config), problem))
    if saved.get("adapters_only"):
        state.update({k: v for k, v in current.items() if k not in state})


def describe_peft(config: Any) -> str:
    """A peft config in words: its class and the fields set to other than their defaults, e.g.
    ``LoraConfig(r=16, lora_alpha=32, target_modules='all-linear')``."""
    if config is None:
        return "no model.peft"
    try:
        defaults = type(config)().to_dict()
    except (TypeError, ValueError):  # a config class without defaults for every field: show them all
        defaults = {}
    fields = [
        f"{key}={_plain(value)!r}"
        for key, value in config.to_dict().items()
        if key not in _BOOKKEEPING and (key not in defaults or defaults[key] != value)
    ]
    return f"{type(config).__name__}({', '.join(fields)})"


def _plain(value: Any) -> Any:
    """Sets as sorted lists (peft turns target lists into sets): the same words in every process."""
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _plain_state_dict(module: pl.LightningModule) -> bool:
    """Whether the strategy writes ``checkpoint["state_dict"]`` as the module's hook leaves it and loads it with
    ``module.load_state_dict`` after ``on_load_checkpoint`` (Lightning's own ``Strategy`` methods: single device,
    DDP; no trainer: ``load_from_checkpoint``). FSDP, FSDP2 and DeepSpeed override them."""
    from lightning.pytorch.strategies import Strategy

    if module._trainer is None:
        return True
    kind = type(module.trainer.strategy)
    return (
        kind.lightning_module_state_dict is Strategy.lightning_module_state_dict
        and kind.load_model_state_dict is Strategy.load_model_state_dict
    )


def _frozen_names(module: pl.LightningModule) -> set[str]:
    """State-dict names of the policy's frozen parameters (the base weights; tied ones under every name)."""
    prefix = next(f"{name}." for name, child in module.named_children() if child is module.policy)
    return {prefix + n for n, p in module.policy.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _adapter_mismatch(saved: dict[str, Tensor], current: dict[str, Tensor], trainable: set[str]) -> str | None:
    """What keeps the checkpoint's tensors ``saved`` from loading as the module's ``trainable`` ones, in words, or
    None: adapters it lacks, tensors the module has no place for, tensors of another shape."""
    missing = sorted(trainable - saved.keys())
    unknown = sorted(saved.keys() - current.keys())
    reshaped = sorted(k for k in trainable & saved.keys() if tuple(saved[k].shape) != tuple(current[k].shape))
    problems = []
    if reshaped:
        first = reshaped[0]
        shapes = f"{list(saved[first].shape)} in the checkpoint, {list(current[first].shape)} here"
        problems.append(f"{len(reshaped)} adapter tensors of another shape (e.g. {first}: {shapes})")
    if missing:
        problems.append(f"{len(missing)} configured adapter tensors missing from it (e.g. {missing[0]})")
    if unknown:
        problems.append(f"{len(unknown)} tensors this model has no place for (e.g. {unknown[0]})")
    return "; ".join(problems) or None


def _refusal(module: pl.LightningModule, theirs: str, ours: str, problem: str) -> str:
    path = getattr(module._trainer, "ckpt_path", None) if module._trainer is not None else None
    where = f"The checkpoint {path}" if path else "The checkpoint"
    return (
        f"{where} holds the adapters of {theirs}, which do not match model.peft of this run ({ours}): {problem}."
        " Resume with the peft config the checkpoint was trained with, or start a new run."
    )
