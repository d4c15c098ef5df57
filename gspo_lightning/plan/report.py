"""``gspo-lightning plan``: a run's memory budget per device, whether it fits, and the knob to turn.

:func:`plan_run` assembles the terms of ``plan.budget`` for a parsed ``fit`` configuration; :func:`render` prints
them as a table (GiB = 2^30 bytes), with the peak phase, the dominant term and, when the run does not fit or
comes within 10% of the device's memory, one concrete change. The command exits with
:data:`DOES_NOT_FIT_STATUS` after a report that does not fit, 0 after one that does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gspo_lightning.plan.architecture import Architecture, adapter_params, load_architecture
from gspo_lightning.plan.budget import (
    Shapes,
    Term,
    engine_terms,
    host_terms,
    param_bytes,
    runtime_terms,
    shapes,
    state_terms,
    update_terms,
)
from gspo_lightning.plan.run import GIB, RunSpec, host_memory, parse_memory, run_spec

DEFAULT_GPU_MEMORY = 80 * 10**9  # an 80 GB H100 / A100 when no GPU is visible and none is given
ALWAYS_SHOWN = ("policy weights", "gradients", "optimizer states", "activations")
HEADROOM = 0.9  # within 10% of the device's memory a run is not called safe
DOES_NOT_FIT_STATUS = 3  # the exit status of `gspo-lightning plan` after a report that says DOES NOT FIT
NOT_MODELLED = (
    "not modelled: the allocator's fragmentation and cache (keep ~10% free), Python and library memory on the"
    " host, dynamic sampling's extra rounds, evaluation batches (data.heldout.batch_size)"
)
CPU_HEAP = (
    "on CPU these are live tensors: glibc keeps freed blocks under its mmap threshold, so the RSS can read up to"
    " ~1.5x (benchmarks/RESULTS.md); MALLOC_MMAP_THRESHOLD_=65536 returns them"
)


@dataclass(frozen=True)
class MemoryPlan:
    """The budget of one run on one device. Byte values; phases ``generation`` and ``update``."""

    run: RunSpec
    arch: Architecture
    shapes: Shapes
    terms: list[Term]
    host: list[tuple[str, float]]
    device_memory: int
    device_source: str
    adapters: int

    def total(self, phase: str) -> float:
        return sum(getattr(t, phase) for t in self.terms)

    @property
    def peak_phase(self) -> str:
        return "update" if self.total("update") >= self.total("generation") else "generation"

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory

    @property
    def dominant(self) -> Term:
        return max(self.terms, key=lambda t: getattr(t, self.peak_phase))


def _device_memory(run: RunSpec, given: str | None) -> tuple[int, str]:
    if given is not None:
        return parse_memory(given), "given"
    if run.accelerator == "cpu":
        return host_memory(), "this machine's RAM"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    return DEFAULT_GPU_MEMORY, "assumed 80 GB GPU: pass --device_memory"


def plan_run(config: dict[str, Any], device_memory: str | None = None) -> MemoryPlan:
    """The :class:`MemoryPlan` of a parsed ``fit`` configuration (``Namespace.as_dict()``), offline.

    Raises:
        ValueError: a bad ``device_memory``, a model whose numbers cannot be found offline, or a strategy or
            precision the planner does not model (one line each).
    """
    run = run_spec(config)
    arch = load_architecture(run.model, run.trust_remote_code)
    adapters = adapter_params(run.model, run.peft, run.trust_remote_code) if run.peft is not None else 0
    memory, source = _device_memory(run, device_memory)
    s = shapes(run, arch)
    terms = [
        *state_terms(run, arch, adapters, s),
        *update_terms(run, arch, s),
        *engine_terms(run, arch, s, memory),
        *runtime_terms(run),
    ]
    return MemoryPlan(run, arch, s, terms, host_terms(run, arch, adapters), memory, source, adapters)


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _count(n: float) -> str:
    """A parameter count: 30.53B, 444.9K."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def _fitting_tokens(plan: MemoryPlan, term: Term) -> int:
    """The largest micro-batch token budget whose activations fit, scaling them linearly with tokens."""
    room = plan.device_memory * HEADROOM - (plan.peak - term.update)
    tokens = plan.shapes.micro_tokens * max(room, 0.0) / max(term.update, 1.0)
    return max(int(tokens // 1024) * 1024, plan.shapes.length)


def advice(plan: MemoryPlan) -> str | None:
    """One concrete change when the run does not fit or comes within 10% of the device; else None."""
    if plan.peak <= plan.device_memory * HEADROOM:
        return None
    run, term, s = plan.run, plan.dominant, plan.shapes
    sharded = run.strategy.shard_params
    more = "more devices (--trainer.devices / --trainer.num_nodes)"
    if term.knob == "accumulation":
        needed = math.ceil(s.sequences_per_rank / s.per_micro)
        return (
            "FSDP keeps every gradient unsharded while micro-batches accumulate: reduce-scatter after each one"
            " (--model.sharding.sync_every_micro_batch true, the default), or make each mini-batch one micro-batch per"
            f" rank (--model.update.mini_batches {needed}, which changes the algorithm)"
        )
    if term.knob == "activations" and not run.gradient_checkpointing:
        return "turn on gradient checkpointing: --model.policy.gradient_checkpointing true"
    if term.knob == "activations":
        return f"smaller micro-batches: --model.batching.micro_batch_tokens {_fitting_tokens(plan, term)}"
    if term.knob == "head":
        chunk = max((run.logprob_chunk_size or s.micro_response) // 4, 16)
        return f"smaller log-prob head chunks: --model.batching.logprob_chunk_size {chunk}"
    if term.knob == "staleness" or (run.max_staleness > 0 and term.knob in ("engine", "engine_batch")):
        return (
            "synchronous rollouts (--data.max_staleness 0), or vLLM servers on devices of their own: VLLMServerEngine"
        )
    if term.knob == "engine" and run.engine.kind == "vllm":
        others = plan.total("generation") - term.generation
        share = max(math.floor((plan.device_memory * HEADROOM - others) / plan.device_memory * 20) / 20, 0.05)
        if not run.engine.enable_sleep_mode and plan.peak_phase == "update":
            return "release vLLM's memory while training: --data.engine.init_args.enable_sleep_mode true"
        return f"a smaller vLLM share: --data.engine.init_args.gpu_memory_utilization {share:g}"
    if term.knob == "engine_batch":
        batch = max((run.engine.batch_size or s.generate_sequences // run.num_samples) // 2, 1)
        return f"fewer prompts per generate call: --data.engine.init_args.batch_size {batch}, or VLLMEngine"
    if term.knob == "staleness" or (run.max_staleness > 0 and term.knob in ("engine", "engine_batch")):
        return (
            "synchronous rollouts (--data.max_staleness 0), or vLLM servers on devices of their own (VLLMServerEngine)"
        )
    if term.knob == "reference":
        return "LoRA (--config configs/lora.yaml: the reference is the policy with its adapters off) or FSDP2"
    if term.knob in ("shard", "offload") and not sharded:
        return "shard the model: --config configs/strategies/fsdp2.yaml over more devices, or LoRA adapters"
    if term.knob == "offload":
        return f"offload the optimizer states (--model.sharding.fsdp_cpu_offload true, or ZeRO-3 offload), or {more}"
    return f"{more}, or LoRA adapters (--config configs/lora.yaml)"


def _header(plan: MemoryPlan) -> list[str]:
    run, a, s = plan.run, plan.arch, plan.shapes
    moe = f", MoE {a.num_experts} experts top-{a.experts_per_token}" if a.is_moe else ""
    lora = f", LoRA {_count(plan.adapters)} trainable" if run.peft is not None else ""
    device = "CPU" if run.accelerator == "cpu" else "GPU"
    engine = run.engine.name + (f" (batch_size {run.engine.batch_size})" if run.engine.batch_size else "")
    return [
        f"model: {a.name}: {_count(a.params)} params, {a.num_layers} layers, hidden {a.hidden_size}, "
        f"V={a.vocab_size:,}{moe}{lora} ({a.source})",
        f"run: {run.world_size} {device}(s), {run.strategy.label}, precision {run.precision}, "
        f"weights {param_bytes(run, a)} B/param, optimizer {run.optimizer}",
        f"batch per rank: {s.sequences_per_rank} sequences of <= {s.length:,} tokens, {run.mini_batches} mini-batches"
        f" of {s.mini_batch}, {s.micro_batches} micro-batch(es) of <= {s.micro_tokens:,} tokens; engine {engine}",
    ]


def render(plan: MemoryPlan) -> str:
    """The plan as a table a person reads at a glance (GiB per device and phase)."""
    rows = [t for t in plan.terms if t.generation or t.update or t.name in ALWAYS_SHOWN]
    unit, scale = ("GiB", GIB) if plan.peak >= GIB else ("MiB", 2**20)
    width = max(len(t.name) for t in rows) + 2

    def cell(value: float, size: int) -> str:
        return f"{value / scale:.2f}".rjust(size)

    lines = [*_header(plan), ""]
    lines.append(f"{f'per device ({unit})'.ljust(width)} {'generation':>10} {'update':>8}   how it is counted")
    for t in rows:
        lines.append(f"{t.name.ljust(width)} {cell(t.generation, 10)} {cell(t.update, 8)}   {t.note}")
    gen, upd = plan.total("generation"), plan.total("update")
    lines.append(f"{'total'.ljust(width)} {cell(gen, 10)} {cell(upd, 8)}")
    lines.append("")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    share = plan.peak / plan.device_memory
    lines.append(
        f"device memory {_gib(plan.device_memory)} GiB ({plan.device_source}): {verdict}; peak phase: "
        f"{plan.peak_phase} at {cell(plan.peak, 0)} {unit} ({share:.0%})"
    )
    top = plan.dominant
    lines.append(
        f"dominant term: {top.name} ({cell(getattr(top, plan.peak_phase), 0)} {unit} in the {plan.peak_phase})"
    )
    hint = advice(plan)
    if hint is not None:
        lines.append(f"knob: {hint}")
    if plan.host:
        moved = ", ".join(f"{name} {_gib(value)} GiB" for name, value in plan.host)
        lines.append(f"host memory per rank: {moved}")
    lines.append(NOT_MODELLED)
    if plan.run.accelerator == "cpu":
        lines.append(CPU_HEAP)
    return "\n".join(lines)
