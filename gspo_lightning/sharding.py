"""Sharded models: FSDP2 sharding per decoder layer, sharding predicates, and gathering full weights.

This module knows about parameters, not about training loops: the training side
(:mod:`gspo_lightning.training.strategy`), the rollout engines, which hold their own copy of the weights, and
the export callback (:mod:`gspo_lightning.callbacks.hf_export`) all import it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model (its ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__} (no _no_split_modules classes): FSDP2 shards"
            " each transformer block separately and needs to know which modules they are."
        )
    return layers


def shard_fsdp2(model: nn.Module, mesh, mixed_precision: bool = False, cpu_offload: bool = False) -> nn.Module:
    """Apply ``fully_shard`` to every decoder layer, then to the whole model (FSDP2).

    Args:
        model: the (unsharded) model; sharded in place.
        mesh: the data-parallel device mesh.
        mixed_precision: compute in bfloat16, reduce gradients in float32.
        cpu_offload: keep parameters and optimizer state on the CPU between uses.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def fill_from_rank0(model: nn.Module, load_full, device: torch.device, group=None) -> None:
    """Give a model built on the meta device and sharded with :func:`shard_fsdp2` its weights, loaded on
    global rank 0 only and sent to every rank as its shards: no other rank ever holds the full weights.

    Args:
        model: the sharded meta-device model; materialised in place on ``device``.
        load_full: builds the full model with its weights (called on rank 0 only).
        device: where the shards live (the CPU under CPU offload).
        group: the process group of the mesh the model is sharded over (buffers are broadcast in it).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    rank0 = dist.get_rank() == 0
    full = load_full() if rank0 else None
    weights = full.state_dict() if full is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    # buffers are replicated, and non-persistent ones (rotary inv_freq) are not in any state dict
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for name, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(full_buffers[name])
        dist.broadcast(buffer, src=src, group=group)
    del full, weights


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2 / tensor parallel)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def is_zero3(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on the CPU. A collective call when the model is sharded (FSDP2
    DTensors, DeepSpeed ZeRO-3): every rank must make it; under ZeRO-3 each gets the full weights, under FSDP2
    global rank 0 only (an empty dict elsewhere)."""
    if is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        return get_model_state_dict(model, options=options)
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}


def is_fsdp1(model: nn.Module) -> bool:
    """True when ``model`` is, or holds, an FSDP1 ``FullyShardedDataParallel`` wrapper (Lightning's
    ``FSDPStrategy``); FSDP2's ``fully_shard`` modules are not."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def full_child_state_dict(root: nn.Module, name: str, child: nn.Module) -> dict[str, Tensor]:
    """The full weights on the CPU of ``root``'s child ``name`` (``child``), keyed as in ``child``: a collective
    when sharded, every rank calls it; under FSDP1 and FSDP2 only global rank 0 gets them (an empty dict
    elsewhere).

    Under FSDP1 (Lightning's ``FSDPStrategy`` wraps the LightningModule, the ``root``) the child's own
    parameters are views of the root's flat ones, so the root's full state dict is taken and the ``<name>.``
    prefix removed; otherwise :func:`full_state_dict` gathers the child (FSDP2 DTensors, ZeRO-3 partitions).

    Args:
        root: the outermost module as the strategy holds it (``trainer.model``).
        name: the child's attribute name on the unwrapped module (e.g. ``"policy"``).
        child: that child.
    """
    if is_fsdp1(root):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(root, options=options)
        return {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
    return full_state_dict(child)
