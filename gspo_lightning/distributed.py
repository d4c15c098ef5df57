"""Sharded-model helpers: FSDP2 sharding per decoder layer, and gathering full weights.

Used by :class:`~gspo_lightning.module.GSPOModule` under Lightning's ``ModelParallelStrategy`` (FSDP2), by
the Hugging Face export and by rollout engines that hold their own copy of the weights.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from gspo_lightning.components.aggregation import LossCounts


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


def is_sharded(model: nn.Module) -> bool:
    """True when some parameter is a DTensor (FSDP2 / tensor parallel)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def is_zero3(model: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 partitions the parameters (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on the CPU. A collective call when the model is sharded (FSDP2
    DTensors, DeepSpeed ZeRO-3): every rank must make it; each gets the full weights."""
    if is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False)
        return get_model_state_dict(model, options=options)
    return {name: value.detach().cpu() for name, value in model.state_dict().items()}


def clip_and_norm(trainer, policy: nn.Module, max_norm: float | None) -> Tensor:
    """Clip the policy's gradients by global norm and return the norm, the way each strategy needs it.

    DeepSpeed clips inside its own step (its config's ``gradient_clipping``): NaN is returned here and the
    module reads DeepSpeed's norm after the step. FSDP1 computes the norm over all shards through its root
    wrapper; FSDP2 and plain modules use ``clip_grad_norm_`` (DTensor-aware).
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    limit = max_norm if max_norm is not None else float("inf")
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        return torch.full((), float("nan"))
    if isinstance(trainer.strategy, FSDPStrategy):
        norm = trainer.model.clip_grad_norm_(limit)
    else:
        params = [p for p in policy.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else torch.zeros(())
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach().float()


def full_policy_state_dict(trainer, policy: nn.Module) -> dict[str, Tensor]:
    """The policy's full weights on the CPU (a collective under sharded strategies: every rank calls it).

    Under Lightning's FSDP1 the wrapped root is the LightningModule, so its full state dict is taken and the
    ``policy.`` prefix removed; FSDP2 DTensors and DeepSpeed ZeRO-3 partitions are gathered by
    :func:`full_state_dict`.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(trainer.model, options=options)
        return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    return full_state_dict(policy)


def data_parallel_mesh(trainer, device_mesh):
    """The FSDP2 data-parallel mesh under Lightning's ``ModelParallelStrategy``, else None.

    Args:
        trainer: the Trainer (or None outside one).
        device_mesh: a callable returning the module's device mesh (only called under that strategy).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    mesh = device_mesh()
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError("Tensor parallelism is not supported yet: set tensor_parallel_size=1 (FSDP2 only).")
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def global_counts(strategy, mask: Tensor, device) -> LossCounts:
    """The loss denominators of ``mask`` summed over every data-parallel rank (see ``aggregation``)."""
    local = LossCounts.from_mask(mask)
    local_t = torch.tensor([local.num_tokens, local.num_seqs], device=device, dtype=torch.float64)
    summed = strategy.reduce(local_t, reduce_op="sum")
    return LossCounts(num_tokens=float(summed[0]), num_seqs=float(summed[1]))


def no_backward_sync(strategy):
    """A context that skips the gradient all-reduce of one backward (DDP accumulation), where supported."""
    block = getattr(strategy, "block_backward_sync", None)
    return block() if block is not None else nullcontext()
