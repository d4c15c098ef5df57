"""What a run is, read from the configuration ``fit`` reads, without instantiating anything of it.

:func:`run_spec` takes the parsed ``fit`` configuration as a plain dict (jsonargparse's ``as_dict``: classes as
``{"class_path", "init_args"}``) and returns a :class:`RunSpec`: devices and strategy, precision, batch
shapes, the parts that hold memory (reference model, adapters, optimizer states, rollout engine). Only a
``peft`` config is built (a small dataclass), to count its adapters.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Literal

StrategyKind = Literal["single", "ddp", "fsdp2", "fsdp", "deepspeed"]
GIB = 2**30
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": GIB}
_UNITS["tib"] = 2**40
_PRECISIONS = {
    None: "32-true", "32": "32-true", "32-true": "32-true", "64": "64-true", "64-true": "64-true",
    "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16-true": "16-true", "bf16-true": "bf16-true", "transformer-engine": "bf16-mixed",
}  # fmt: skip
_STATES = {"Adam": 2, "AdamW": 2, "NAdam": 2, "RAdam": 2, "Adamax": 2, "Adagrad": 1, "Adadelta": 2, "LBFGS": 2}


def parse_memory(text: str) -> int:
    """Bytes of a size such as ``80GiB``, ``80 GB``, ``81920MiB`` or ``1.5TiB`` (GB = 10^9, GiB = 2^30).

    Raises:
        ValueError: no number, no known unit, or not a finite size of at least one byte (one line with examples).
    """
    cleaned = str(text).strip().replace(" ", "").lower()
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):  # also refuses nan, inf and sizes below a byte (0.5B)
        raise ValueError(
            f"--device_memory {text!r}: give a finite size of at least 1 byte with a unit, e.g. 80GiB, 80GB or"
            " 81920MiB."
        )
    return int(value)


def host_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class StrategySpec:
    """How the trainer's state is laid out over the data-parallel ranks.

    Attributes:
        kind: single device, DDP, FSDP2 (Lightning ``ModelParallelStrategy``), FSDP1 (``FSDPStrategy``), DeepSpeed.
        label: how the table names it.
        shards: ranks each sharded state is split over (1: replicated).
        shard_params / shard_grads / shard_optimizer: which states are split (ZeRO-1/2/3, FSDP).
        offload_params / offload_optimizer: those states live in host memory (FSDP2/FSDP1 CPU offload, ZeRO offload).
        grad_bucket_view: DDP's ``gradient_as_bucket_view``: the gradients are views of the reducer's buckets
            instead of a second copy.
    """

    kind: StrategyKind
    label: str
    shards: int = 1
    shard_params: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    offload_params: bool = False
    offload_optimizer: bool = False
    grad_bucket_view: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """The rollout engine: ``transformers`` (``generate`` on the policy), ``vllm`` (colocated), ``served`` (vLLM
    servers on devices of their own), or ``other``."""

    kind: Literal["transformers", "vllm", "served", "other"]
    name: str
    batch_size: int | None = None
    gpu_memory_utilization: float = 0.5
    enable_sleep_mode: bool = False
    tensor_parallel_size: int = 1
    kv_cache_memory_bytes: int | None = None
    dtype: str = "policy"


@dataclass(frozen=True)
class RunSpec:
    """Everything the planner reads of a run (one line each; see ``GSPOModule`` / ``RolloutDataModule``)."""

    model: str
    trust_remote_code: bool
    accelerator: Literal["cpu", "gpu"]
    devices: int
    num_nodes: int
    strategy: StrategySpec
    precision: str
    dtype: str
    gradient_checkpointing: bool
    micro_batch_size: int | None
    micro_batch_tokens: int | None
    mini_batches: int
    logprob_chunk_size: int | None
    reference: bool
    peft: Any | None
    fsdp_mixed_precision: bool
    sync_every_micro_batch: bool | None
    optimizer: str
    optimizer_states: int
    records_routing: bool
    engine: EngineSpec
    prompts_per_step: int
    num_samples: int
    max_new_tokens: int
    max_prompt_length: int
    max_staleness: int = 0

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _class(value: Any) -> tuple[str, dict[str, Any]]:
    """``(class name, init_args)`` of a parsed class value (a dict with ``class_path``, or a plain string)."""
    if isinstance(value, dict):
        return str(value.get("class_path", "")).rsplit(".", 1)[-1], dict(value.get("init_args") or {})
    return ("" if value is None else str(value)), {}


def _import(value: dict[str, Any]) -> Any:
    module, _, name = str(value["class_path"]).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _with_defaults(value: dict[str, Any]) -> dict[str, Any]:
    """A class value's init_args over its ``__init__`` defaults."""
    params = inspect.signature(_import(value)).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return {**defaults, **(value.get("init_args") or {})}


def _devices(value: Any, accelerator: str) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, str) and "," in value:
        return len([v for v in value.split(",") if v.strip()])
    if accelerator == "gpu":
        import torch

        return max(torch.cuda.device_count(), 1)
    return 1


def _accelerator(value: Any) -> Literal["cpu", "gpu"]:
    name, _ = _class(value)
    name = name.lower().removesuffix("accelerator")
    if name in ("", "auto"):
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu" if name == "cpu" else "gpu"


def _deepspeed(args: dict[str, Any], shards: int, label: str) -> StrategySpec:
    zero = ((args.get("config") or {}).get("zero_optimization") or {}) if isinstance(args.get("config"), dict) else {}
    stage = int(zero.get("stage", args.get("stage", 2)))
    offload_opt = bool(args.get("offload_optimizer")) or (zero.get("offload_optimizer") or {}).get("device") in (
        "cpu", "nvme",
    )  # fmt: skip
    offload_par = bool(args.get("offload_parameters")) or (zero.get("offload_param") or {}).get("device") in (
        "cpu", "nvme",
    )  # fmt: skip
    offload = " + offload" if offload_opt or offload_par else ""
    return StrategySpec(
        "deepspeed", f"{label} ZeRO-{stage}{offload} over {shards}", shards, stage >= 3, stage >= 2, stage >= 1,
        offload_par and stage >= 3, offload_opt,
    )  # fmt: skip


def _strategy_class(value: Any, world: int) -> tuple[type, dict[str, Any]]:
    """The strategy class ``trainer.strategy`` stands for and its arguments, resolved as ``fit`` resolves them:
    ``auto`` (one device: single device, more: DDP), a name of Lightning's ``StrategyRegistry`` in any case with
    its registered arguments, or a class value.

    Raises:
        ValueError: a name ``fit`` refuses (one line listing the valid ones) or a class that cannot be imported.
    """
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry

    if isinstance(value, dict):
        try:
            return _import(value), dict(value.get("init_args") or {})
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"trainer.strategy: cannot import {value.get('class_path')!r} ({err}).") from None
    name = "auto" if value is None else str(value).lower()
    if name == "auto":
        return (SingleDeviceStrategy if world == 1 else DDPStrategy), {}
    if name not in StrategyRegistry:
        names = ", ".join(["auto", *StrategyRegistry.available_strategies()])
        raise ValueError(
            f"trainer.strategy={value!r} is not a strategy fit accepts: use one of {names}, or a strategy class"
            " (class_path)."
        )
    entry = StrategyRegistry[name]
    return entry["strategy"], dict(entry["init_params"])


def strategy_spec(value: Any, world: int, devices: int) -> StrategySpec:
    """The :class:`StrategySpec` of ``trainer.strategy`` (a name or a class value) on ``world`` ranks.

    Raises:
        ValueError: a strategy ``fit`` refuses, or one the planner does not model (one line each).
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
        SingleDeviceXLAStrategy,
        XLAStrategy,
    )

    cls, args = _strategy_class(value, world)
    label = cls.__name__
    if issubclass(cls, SingleDeviceStrategy) and not issubclass(cls, SingleDeviceXLAStrategy) and world == 1:
        return StrategySpec("single", "single device")
    if issubclass(cls, ModelParallelStrategy):
        tp = int(args.get("tensor_parallel_size", 1) or 1)
        dp = args.get("data_parallel_size", "auto")
        dp = world // tp if dp in (None, "auto") else int(dp)
        return StrategySpec("fsdp2", f"FSDP2 over {dp} (ModelParallelStrategy)", dp, True, True, True)
    if issubclass(cls, FSDPStrategy):
        sharding = str(args.get("sharding_strategy", "FULL_SHARD")).upper().rsplit(".", 1)[-1]
        shards = devices if sharding.startswith("HYBRID") else (1 if sharding == "NO_SHARD" else world)
        offload = bool(args.get("cpu_offload"))
        full = sharding != "NO_SHARD"
        label = f"FSDP {sharding} over {shards}{' + CPU offload' if offload else ''}"
        return StrategySpec("fsdp", label, shards, full, full, full, offload and full, offload and full)
    if issubclass(cls, DeepSpeedStrategy):
        return _deepspeed(args, world, "DeepSpeed")
    if issubclass(cls, DDPStrategy) and not issubclass(cls, XLAStrategy):
        view = bool(args.get("gradient_as_bucket_view", False))
        return StrategySpec("ddp", f"DDP over {world} (full replica per rank)", world, grad_bucket_view=view)
    if issubclass(cls, SingleDeviceStrategy) and not issubclass(cls, SingleDeviceXLAStrategy):
        raise ValueError(f"trainer.strategy={label} runs on one device, but the run has {world}: use auto or ddp.")
    raise ValueError(
        f"trainer.strategy={label}: the planner models auto, single_device, ddp*, fsdp*, deepspeed* and Lightning's"
        f" DDPStrategy, ModelParallelStrategy (FSDP2), FSDPStrategy and DeepSpeedStrategy; not {label}."
    )


def _engine(value: Any) -> EngineSpec:
    name, _ = _class(value)
    if name == "VLLMServerEngine":
        return EngineSpec("served", name)
    if name not in ("TransformersEngine", "VLLMEngine"):
        return EngineSpec("other", name or "none")
    args = _with_defaults(value) if isinstance(value, dict) else {}
    if name == "TransformersEngine":
        return EngineSpec("transformers", name, batch_size=args.get("batch_size"))
    return EngineSpec(
        "vllm", name,
        gpu_memory_utilization=float(args.get("gpu_memory_utilization", 0.5)),
        enable_sleep_mode=bool(args.get("enable_sleep_mode", False)),
        tensor_parallel_size=int(args.get("tensor_parallel_size", 1) or 1),
        kv_cache_memory_bytes=args.get("kv_cache_memory_bytes"),
        dtype=str(args.get("dtype", "policy")),
    )  # fmt: skip


def _optimizer(value: Any) -> tuple[str, int]:
    """The optimizer's name and its states per trainable parameter (AdamW when none is given)."""
    name, args = _class(value)
    name = name or "AdamW"
    if name == "SGD":
        return name, int(float(args.get("momentum", 0.0) or 0.0) > 0)
    if name == "RMSprop":
        return name, 1 + int(float(args.get("momentum", 0.0) or 0.0) > 0) + int(bool(args.get("centered")))
    return name, _STATES.get(name, 2)


def _peft(value: Any) -> Any | None:
    """The ``peft`` config, built by jsonargparse as ``fit`` builds it (nested dataclass fields included)."""
    if not value:
        return None
    from jsonargparse import ArgumentParser
    from peft import PeftConfig

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--peft", type=PeftConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on options the parse spelled out at their defaults
        return parser.instantiate_classes(parser.parse_object({"peft": value})).peft


def _advantage_class(value: Any) -> Any:
    """The advantage class a parsed ``model.advantage`` names (``GSPOModule``'s default when none is given)."""
    if isinstance(value, dict):
        return _import(value)
    from gspo_lightning.components.advantage import ADVANTAGES, GroupNormAdvantage

    return ADVANTAGES.get(str(value)) if value else GroupNormAdvantage


def run_spec(config: dict[str, Any]) -> RunSpec:
    """The :class:`RunSpec` of a parsed ``fit`` configuration (``Namespace.as_dict()``).

    The module's and the data module's option groups are built from it (``training.options``,
    ``rollout.options``): their defaults and decisions (on-policy, Routing Replay, the reference model) are the
    ones ``fit`` uses.
    """
    from gspo_lightning.engines.base import SamplingConfig
    from gspo_lightning.rollout.options import EncodingOptions, RolloutOptions
    from gspo_lightning.training.options import ModuleOptions, needs_reference

    trainer, model, data = config.get("trainer") or {}, config.get("model") or {}, config.get("data") or {}
    options = ModuleOptions.from_config(model)
    rollout, encoding = RolloutOptions(**data.get("rollout") or {}), EncodingOptions(**data.get("encoding") or {})
    accelerator = _accelerator(trainer.get("accelerator"))
    devices = _devices(trainer.get("devices", "auto"), accelerator)
    nodes = int(trainer.get("num_nodes", 1) or 1)
    precision = str(trainer.get("precision")) if trainer.get("precision") is not None else None
    if precision not in _PRECISIONS:
        known = ", ".join(sorted(set(_PRECISIONS.values())))
        raise ValueError(f"trainer.precision={precision!r}: the planner models {known}; use one of them.")
    optimizer, states = _optimizer(model.get("optimizer"))
    sampling = data.get("sampling") or {}
    return RunSpec(
        model=options.policy.path,
        trust_remote_code=options.policy.trust_remote_code,
        accelerator=accelerator,
        devices=devices,
        num_nodes=nodes,
        strategy=strategy_spec(trainer.get("strategy", "auto"), devices * nodes, devices),
        precision=_PRECISIONS[precision],
        dtype=options.policy.dtype,
        gradient_checkpointing=options.policy.gradient_checkpointing,
        micro_batch_size=options.batching.micro_batch_size,
        micro_batch_tokens=options.batching.micro_batch_tokens,
        mini_batches=options.update.mini_batches,
        logprob_chunk_size=options.batching.logprob_chunk_size,
        reference=needs_reference(options.loss, _advantage_class(model.get("advantage"))),
        peft=_peft(model.get("peft")),
        fsdp_mixed_precision=options.sharding.fsdp_mixed_precision,
        sync_every_micro_batch=options.sharding.sync_every_micro_batch,
        optimizer=optimizer,
        optimizer_states=states,
        records_routing=options.moe.holds_routing_records(options.update.on_policy),
        engine=_engine(data.get("engine")),
        prompts_per_step=rollout.prompts_per_step,
        num_samples=rollout.num_samples,
        max_new_tokens=SamplingConfig(**sampling).max_new_tokens,
        max_prompt_length=encoding.max_prompt_length,
        max_staleness=int(data.get("max_staleness") or 0),
    )
