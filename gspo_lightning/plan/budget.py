"""The memory budget of a run on one device, term by term, in its two phases: generation and update.

Generation is the rollout engine producing a rollout batch; the update is the pre-update pass and the optimizer
steps. The trainer's weights and optimizer states live through both; gradients only through the update (the
module sets them to None after each optimizer step; DeepSpeed keeps its gradient buffers and DDP its buckets).
Per term, by strategy (``run.StrategySpec``):

- weights: every parameter in its dtype, divided over the ranks when sharded (FSDP, ZeRO-3), in host memory when
  offloaded; LoRA: the frozen base plus the adapters (float32);
- gradients and optimizer states: of the trainable parameters only (the adapters under LoRA), sharded by
  FSDP / ZeRO-2 (gradients) and FSDP / ZeRO-1 (states). DDP's reducer keeps gradient-sized buckets for its
  lifetime, generation included; the gradients are a second copy in the update unless
  ``gradient_as_bucket_view`` makes them views of the buckets. FSDP reduce-scatters after every micro-batch unless
  ``model.sharding.sync_every_micro_batch: false`` (``training.strategy.backward_sync``): then it holds every unsharded
  gradient (float32 under FSDP2) until the mini-batch's last micro-batch;
- the reference model (``kl_coef > 0`` or an advantage that reads it): a copy of the weights, sharded only
  under FSDP2 (elsewhere it is not part of the wrapped module), none under LoRA (the policy with adapters off);
- sharded strategies gather the parameters they compute with: the root (embeddings, head) and two layers;
- activations, the log-prob head, the KV cache: ``plan.activations``;
- the rollout engine: transformers ``generate`` on the policy (KV cache, logits), or vLLM's reservation
  (``gpu_memory_utilization`` of the device) while generating, released by sleep mode during the update;
- the runtime: the CUDA context and kernels, NCCL's buffers, which the planner states rather than computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gspo_lightning.plan.activations import (
    FP32,
    Widths,
    decode_logits_bytes,
    kv_cache_bytes,
    no_grad_micro_batch,
    train_micro_batch,
)
from gspo_lightning.plan.architecture import Architecture
from gspo_lightning.plan.run import GIB, RunSpec

CUDA_RUNTIME = 1.0 * GIB  # CUDA context, kernels, cuBLAS workspaces: measured 0.5-1 GiB on H100-class GPUs
NCCL_BUFFERS = 0.5 * GIB  # NCCL communicators' buffers, per rank, when there is more than one rank
_TWO_BYTE = ("bfloat16", "float16")


@dataclass(frozen=True)
class Term:
    """One line of the budget: bytes on one device in each phase, and how they were counted.

    ``knob`` names what lowers the term (``report`` turns it into advice).
    """

    name: str
    generation: float
    update: float
    note: str
    knob: str


@dataclass(frozen=True)
class Shapes:
    """The batch shapes the budget is computed at (worst case: full-length prompts and responses)."""

    sequences_per_rank: int
    mini_batch: int
    per_micro: int
    micro_tokens: int
    micro_response: int
    micro_batches: int
    generate_sequences: int
    length: int


def param_bytes(run: RunSpec, arch: Architecture) -> int:
    """Bytes per parameter of the policy as trained: 2 under ``*-true`` 16-bit precision or DeepSpeed's 16-bit
    modes (which keep float32 master weights in the optimizer), else the loading dtype."""
    if run.precision in ("bf16-true", "16-true"):
        return 2
    if run.strategy.kind == "deepspeed" and run.precision in ("bf16-mixed", "16-mixed"):
        return 2
    return dtype_bytes(run, arch)


def dtype_bytes(run: RunSpec, arch: Architecture) -> int:
    """Bytes per parameter of ``model.policy.dtype`` (``auto``: the checkpoint's ``torch_dtype``)."""
    dtype = arch.config_dtype if run.dtype == "auto" else run.dtype
    return 2 if dtype in _TWO_BYTE else 4


def widths(run: RunSpec, arch: Architecture) -> Widths:
    """Element sizes of activations: 2 bytes when something computes in 16 bits (autocast, 16-bit weights,
    FSDP2 mixed precision); float32 keys under autocast for models that normalise keys with float32 weights."""
    stored = param_bytes(run, arch)
    fsdp_cast = run.strategy.kind == "fsdp2" and run.fsdp_mixed_precision
    sixteen = run.precision != "32-true" and run.precision != "64-true"
    compute = 2 if (sixteen or stored == 2 or fsdp_cast) else 4
    stream = 2 if (stored == 2 or fsdp_cast) else 4
    key = 4 if (compute == 2 and stream == 4 and arch.qk_norm) else compute
    return Widths(compute=compute, stream=stream, key=key)


def shapes(run: RunSpec, arch: Architecture) -> Shapes:
    """Worst-case batch shapes: every prompt ``max_prompt_length`` tokens, every response ``max_new_tokens``."""
    per_rank = math.ceil(run.prompts_per_step * run.num_samples / run.world_size)
    mini = math.ceil(per_rank / run.mini_batches)
    length = run.max_prompt_length + run.max_new_tokens
    if run.micro_batch_tokens is not None:
        per_micro = max(run.micro_batch_tokens // length, 1)
    else:
        per_micro = run.micro_batch_size or mini
    per_micro = min(per_micro, mini)
    tokens = per_micro * length
    if run.micro_batch_tokens is not None and length <= run.micro_batch_tokens:
        # shorter sequences pack more of them: a micro-batch can fill its whole budget
        tokens = min(run.micro_batch_tokens, mini * length)
    prompts = math.ceil(run.prompts_per_step / run.world_size)
    generate = (run.engine.batch_size or prompts) if run.engine.kind == "transformers" else 0
    return Shapes(
        sequences_per_rank=per_rank,
        mini_batch=mini,
        per_micro=per_micro,
        micro_tokens=tokens,
        micro_response=tokens * run.max_new_tokens // length,
        micro_batches=math.ceil(mini / per_micro),
        generate_sequences=min(generate, prompts) * run.num_samples,
        length=length,
    )


def _split(total: float, shards: int, sharded: bool) -> float:
    return total / shards if sharded else total


def state_terms(run: RunSpec, arch: Architecture, adapters: int, s: Shapes) -> list[Term]:
    """Weights, gradients, optimizer states, reference model and gathered parameters of the trainer."""
    st, pb = run.strategy, param_bytes(run, arch)
    trainable = adapters if run.peft is not None else arch.params
    where = f"/{st.shards}" if st.shards > 1 else ""
    weights = _split(arch.params * pb, st.shards, st.shard_params) + adapters * FP32
    weights = 0.0 if st.offload_params else weights
    lora = f" + {adapters:,} fp32 adapters" if run.peft is not None else ""
    shard_note = f", {where} each" if st.shard_params and st.shards > 1 else ""
    note = f"{arch.params:,} x {pb} B{shard_note}{lora}" + (" offloaded to host memory" * st.offload_params)
    terms = [Term("policy weights", weights, weights, note, "shard")]
    deepspeed_16 = st.kind == "deepspeed" and pb == 2
    if deepspeed_16:
        master = _split(trainable * FP32, st.shards, st.shard_optimizer)
        master = 0.0 if st.offload_optimizer else master
        terms.append(Term("fp32 master weights", master, master, "DeepSpeed's copy for 16-bit params", "shard"))
    grad_b = FP32 if (st.kind == "fsdp2" and pb == 4) else pb
    grads = _split(trainable * grad_b, st.shards, st.shard_grads)
    update_grads, note = (
        grads,
        f"{trainable:,} trainable x {grad_b} B" + (f", {where} each" * st.shard_grads if where else ""),
    )
    held = grads if st.kind == "deepspeed" else 0.0  # set to None after each optimizer step, DeepSpeed aside
    knob = "shard"
    if st.kind in ("fsdp2", "fsdp") and s.micro_batches > 1 and run.sync_every_micro_batch is False:
        update_grads = trainable * grad_b
        knob = "accumulation" if update_grads > grads else "shard"
        note = f"unsharded while {s.micro_batches} micro-batches accumulate (sync_every_micro_batch: false)"
    elif st.kind == "ddp":
        # the reducer's buckets, gradient-sized in all, live as long as DDP (generation included); the
        # gradients are a second copy unless they are views of them (gradient_as_bucket_view)
        held = grads
        update_grads = grads if st.grad_bucket_view else 2 * grads
        note += ", views of DDP's buckets" if st.grad_bucket_view else ", + DDP's gradient buckets (kept throughout)"
    terms.append(Term("gradients", held, update_grads, note, knob))
    state_b = FP32 if st.kind == "deepspeed" else pb
    optim = _split(trainable * run.optimizer_states * state_b, st.shards, st.shard_optimizer)
    optim = 0.0 if st.offload_optimizer else optim
    optim_note = f"{run.optimizer}: {run.optimizer_states} x {state_b} B per trainable param"
    optim_note += (f", {where} each" if st.shard_optimizer and where else "") + (
        ", offloaded to host memory" * st.offload_optimizer
    )
    terms.append(Term("optimizer states", optim, optim, optim_note, "offload"))
    if run.reference and run.peft is None:
        ref_shards = st.shards if st.kind == "fsdp2" else 1
        ref = arch.params * dtype_bytes(run, arch) / ref_shards
        ref_note = f"frozen copy, x {dtype_bytes(run, arch)} B" + (f", /{ref_shards}" if ref_shards > 1 else "")
        terms.append(Term("reference model", ref, ref, ref_note, "reference"))
    if st.shard_params:
        w = widths(run, arch)
        gathered = (arch.root_params + 2 * arch.layer_params) * (w.compute if run.fsdp_mixed_precision else pb)
        gen = gathered if run.engine.kind == "transformers" else 0.0
        terms.append(Term("gathered params", gen, gathered, "root (embeddings, head) + 2 layers, unsharded", "shard"))
    if st.kind == "deepspeed" and st.shard_grads:
        buckets = 2 * 5e8 * pb  # reduce and all-gather buckets, DeepSpeed's default 5e8 elements each
        terms.append(Term("ZeRO buckets", buckets, buckets, "reduce + all-gather, 5e8 elements each", "shard"))
    return terms


def update_terms(run: RunSpec, arch: Architecture, s: Shapes) -> list[Term]:
    """Activations, the log-prob head, autocast's weight copies and MoE routing records in the update."""
    w, chunk = widths(run, arch), run.logprob_chunk_size or s.micro_response
    grad_b = FP32 if run.strategy.kind == "fsdp2" else param_bytes(run, arch)
    peak = train_micro_batch(arch, w, s.micro_tokens, s.micro_response, chunk, run.gradient_checkpointing, grad_b)
    no_grad = no_grad_micro_batch(arch, w, s.micro_tokens, s.micro_response, chunk)
    ckpt = "checkpointed" if run.gradient_checkpointing else "no checkpointing"
    head_note = f"log-prob head: chunks of {min(chunk, s.micro_response)} tokens x V={arch.vocab_size:,}"
    top, note, knob = peak.head, head_note, "head"
    if peak.backward > top:
        top, note, knob = (
            peak.backward,
            "a layer's gradients" + (" and recomputation" * run.gradient_checkpointing),
            "activations",
        )
    if no_grad > peak.saved + top:
        top, note, knob = no_grad - peak.saved, "the pre-update pass (no gradient), one micro-batch", "activations"
    terms = [
        Term("activations", 0.0, peak.saved, f"saved by a {s.micro_tokens:,}-token micro-batch, {ckpt}", "activations"),
        Term("backward peak", 0.0, top, note, knob),
    ]
    autocast = run.precision in ("bf16-mixed", "16-mixed") and param_bytes(run, arch) == 4
    autocast = autocast and run.strategy.kind not in ("fsdp", "deepspeed") and not run.fsdp_mixed_precision
    if autocast:
        layers = 1 if run.gradient_checkpointing else arch.num_layers
        copies = arch.layer_linear_params * layers * w.compute
        terms.append(Term("autocast weight copies", 0.0, copies, f"16-bit casts of {layers} layer(s)", "activations"))
    if arch.is_moe and run.records_routing:
        routes = s.sequences_per_rank * arch.moe_layers * s.length * arch.experts_per_token
        routes *= 1 if arch.num_experts <= 256 else 2
        terms.append(Term("MoE routing records", 0.0, routes, "experts per token, layer, sequence", "activations"))
    return terms


def engine_terms(run: RunSpec, arch: Architecture, s: Shapes, device_memory: int) -> list[Term]:
    """The rollout engine's memory on one device while generating (and while training, when it stays). Under
    asynchronous rollouts (``data.max_staleness > 0``) generation runs while the update does: what the engine
    holds counts in both phases, and ``TransformersEngine`` generates from a copy of the weights on the device
    (the vLLM engines' copy stays on the host)."""
    terms = _engine_terms(run, arch, s, device_memory)
    if run.max_staleness <= 0:
        return terms
    note = "; during the update too (asynchronous rollouts)"
    terms = [Term(t.name, t.generation, max(t.update, t.generation), t.note + note, t.knob) for t in terms]
    if run.engine.kind == "transformers":
        copy = arch.params * param_bytes(run, arch)
        terms.append(Term("engine's copy of the weights", copy, copy, "data.max_staleness > 0", "staleness"))
    return terms


def _engine_terms(run: RunSpec, arch: Architecture, s: Shapes, device_memory: int) -> list[Term]:
    e, w = run.engine, widths(run, arch)
    if e.kind == "transformers":
        kv = kv_cache_bytes(arch, w, s.generate_sequences, s.length)
        logits = decode_logits_bytes(arch, w, s.generate_sequences)
        prompt_tokens = s.generate_sequences * run.max_prompt_length
        prefill = no_grad_micro_batch(arch, w, prompt_tokens, 0, 1)
        note = f"{s.generate_sequences} sequences x {s.length:,} tokens"
        return [
            Term("KV cache (generate)", kv, 0.0, note, "engine_batch"),
            Term("generation temporaries", max(logits, prefill), 0.0, "decode logits, or the prefill", "engine_batch"),
        ]
    if e.kind == "vllm":
        vllm_b = {"policy": param_bytes(run, arch), "auto": dtype_bytes(run, arch)}.get(e.dtype)
        vllm_b = vllm_b or (2 if e.dtype in _TWO_BYTE else 4)
        if run.accelerator == "cpu":
            held = arch.params * vllm_b + (e.kv_cache_memory_bytes or GIB)
            return [Term("vLLM (CPU)", held, held, "weights + KV cache (1 GiB unless set)", "engine")]
        reserved = e.gpu_memory_utilization * device_memory
        asleep = 0.0 if e.enable_sleep_mode else reserved
        note = f"gpu_memory_utilization {e.gpu_memory_utilization:g}" + (", sleeps in update" if asleep == 0 else "")
        return [Term("vLLM reservation", reserved, asleep, note, "engine")]
    if e.kind == "served":
        return [Term("vLLM servers", 0.0, 0.0, "on devices of their own (VLLMServerEngine)", "engine")]
    return [Term(f"engine {e.name}", 0.0, 0.0, "not modelled: add its memory by hand", "engine")]


def runtime_terms(run: RunSpec) -> list[Term]:
    """What the planner states rather than computes: the CUDA runtime, and NCCL with more than one rank."""
    if run.accelerator == "cpu":
        return []
    total = CUDA_RUNTIME + (NCCL_BUFFERS if run.world_size > 1 else 0.0)
    note = "CUDA context 1 GiB" + (" + NCCL 0.5 GiB" if run.world_size > 1 else "") + " (stated, not computed)"
    return [Term("runtime", total, total, note, "none")]


def host_terms(run: RunSpec, arch: Architecture, adapters: int) -> list[tuple[str, float]]:
    """What moves to host memory, per rank: offloaded states and a sleeping vLLM's weights."""
    st, pb = run.strategy, param_bytes(run, arch)
    trainable = adapters if run.peft is not None else arch.params
    out = []
    if st.offload_params:
        out.append(("offloaded weights", _split(arch.params * pb, st.shards, True)))
    if st.offload_optimizer:
        out.append(("offloaded optimizer states", trainable * run.optimizer_states * FP32 / st.shards))
    if run.engine.kind == "vllm" and run.engine.enable_sleep_mode and run.accelerator == "gpu":
        vllm_b = 2 if run.engine.dtype in (*_TWO_BYTE, "auto") else pb
        out.append(("vLLM weights asleep", arch.params * vllm_b / run.engine.tensor_parallel_size))
    return out
