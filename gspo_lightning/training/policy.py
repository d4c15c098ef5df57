"""Loading the models the trainer runs: the policy (dropout off, checkpointing on request) and the frozen
reference, whole or sharded from rank 0."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from gspo_lightning.adapters import AdapterDisabled, apply_peft, transformers_model
from gspo_lightning.models import DType, empty_causal_lm, has_dropout, load_causal_lm
from gspo_lightning.moe import MoELayout, RoutingController, moe_layout
from gspo_lightning.moe.routing import routing_controller
from gspo_lightning.sharding import fill_from_rank0, shard_fsdp2
from gspo_lightning.training.logprobs import mark_full_logits, verify_chunked_head
from gspo_lightning.training.options import ModuleOptions


def set_dropout_to_zero(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0: ``nn.Dropout`` modules, attention modules' float
    ``*dropout`` attributes (transformers passes ``attention_dropout`` to the attention kernel) and the
    config's. Returns how many were non-zero.

    pi_old and the reference are computed in eval mode; with dropout active in the update's train-mode
    forwards, the ratio at identical weights is not 1 (every GSPO sequence is clipped at dropout 0.1).
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, _DropoutNd):
            changed += module.p > 0
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                changed += value > 0
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    for name, value in (config.to_dict() if config is not None else {}).items():
        if name.endswith("dropout") and isinstance(value, float) and value > 0:
            setattr(config, name, 0.0)
    return int(changed)


def load_policy(
    model: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    disable_dropout: bool = True,
    empty: bool = False,
) -> nn.Module:
    """The policy in train mode, without KV cache (training forwards never reuse one), dropout off unless
    ``disable_dropout`` is False (then a warning says what that does to the ratios). ``empty``: built on the
    meta device without weights (:func:`~gspo_lightning.models.empty_causal_lm`), for sharded loading."""
    policy = (empty_causal_lm if empty else load_causal_lm)(model, dtype, trust_remote_code, attn_implementation)
    if disable_dropout:
        set_dropout_to_zero(policy)
    elif has_dropout(policy):
        warnings.warn(
            "model.policy.disable_dropout=false and the policy has active dropout: pi_old is computed without it, the"
            " update with it, so ratios differ from 1 at identical weights and clipping fires at random.",
            stacklevel=2,
        )
    if gradient_checkpointing:
        # the recompute needs the forward's RNG state only for dropout; without it, stashing and setting the
        # process's generator in backward costs time and disturbs a rollout thread sampling from it
        kwargs = {"use_reentrant": False, "preserve_rng_state": has_dropout(policy)}
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    policy.config.use_cache = False
    return policy.train()  # from_pretrained returns eval mode


def load_reference(
    model: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    empty: bool = False,
) -> nn.Module:
    """The frozen reference model pi_ref (eval mode, no gradient); ``empty`` as in :func:`load_policy`."""
    loaded = (empty_causal_lm if empty else load_causal_lm)(model, dtype, trust_remote_code, attn_implementation)
    return loaded.eval().requires_grad_(False)


def shard_from_rank0(
    model: nn.Module,
    load: dict[str, Any],
    mesh,
    device: torch.device,
    mixed_precision: bool = False,
    cpu_offload: bool = False,
) -> None:
    """FSDP2: shard a model built with ``empty=True`` per decoder layer, then fill its shards with the weights
    global rank 0 loads (``load_reference(**load)``: only its weights are used): peak host memory is one
    full copy on rank 0 and a shard on every other rank, instead of a full copy on every rank."""
    shard_fsdp2(model, mesh, mixed_precision, cpu_offload)
    target = torch.device("cpu") if cpu_offload else device
    fill_from_rank0(model, lambda: load_reference(**load), target, mesh.get_group())


@dataclass
class TrainerModels:
    """What :func:`build_models` loads: the policy, the reference (or None), the policy's MoE layout (None for a
    dense model) and its routing controller (None unless replay or a routing metric needs one)."""

    policy: nn.Module
    reference: nn.Module | None
    moe: MoELayout | None
    routing: RoutingController | None


def build_models(
    options: ModuleOptions, peft_config: Any | None, with_reference: bool, mesh=None, device: torch.device | None = None
) -> TrainerModels:
    """Load the policy (with its adapters under ``peft``), its MoE wiring and, ``with_reference``, the reference.

    With a data-parallel ``mesh`` (FSDP2) every rank builds on the meta device and rank 0 alone loads the
    weights, sharded onto ``device`` (with adapters, every rank loads the frozen base, since the adapters are
    created on top of real weights; the root is then the transformers model, as ``generate()`` calls it
    directly, past the peft wrapper). Under peft the reference is the policy with its adapters off.

    Last, the chunked log-prob head is checked against the policy's own logits on a probe batch
    (:func:`~gspo_lightning.training.logprobs.verify_chunked_head`); when they differ, policy and reference compute
    full-vocabulary logits instead, with one log line.
    """
    load, policy_options = options.policy.load_kwargs(), options.policy
    empty = mesh is not None and peft_config is None
    policy = load_policy(
        **load, gradient_checkpointing=policy_options.gradient_checkpointing,
        disable_dropout=policy_options.disable_dropout, empty=empty,
    )  # fmt: skip
    if peft_config is not None:
        policy = apply_peft(policy, peft_config)
        if policy_options.disable_dropout:
            set_dropout_to_zero(policy)
    layout, moe = moe_layout(policy.config), options.moe
    routing = routing_controller(policy, layout, moe.replay, moe.tracks_routing, moe.router_aux_loss_coef)
    reference = None
    if with_reference:
        reference = AdapterDisabled(policy) if peft_config is not None else load_reference(**load, empty=empty)
    if mesh is not None:
        fsdp = (options.sharding.fsdp_mixed_precision, options.sharding.fsdp_cpu_offload)
        if peft_config is not None:
            shard_fsdp2(transformers_model(policy).to(device), mesh, *fsdp)
        else:
            for model in (policy, reference):
                if model is not None:
                    shard_from_rank0(model, load, mesh, device, *fsdp)
    reason = verify_chunked_head(policy, options.batching.logprob_chunk_size, device)
    if reason is not None and reference is not None:
        mark_full_logits(reference, reason)  # the same architecture: no second probe
    return TrainerModels(policy, reference, layout, routing)
