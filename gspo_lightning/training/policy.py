"""Loading the models the trainer runs: the policy, the frozen reference, and the policy's MoE wiring."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from gspo_lightning.models import DType, empty_causal_lm, load_causal_lm
from gspo_lightning.moe.layout import MoELayout
from gspo_lightning.moe.routing import RoutingController
from gspo_lightning.sharding import fill_from_rank0, shard_fsdp2
from gspo_lightning.training.pre_update import ReplayMode

CHECKED_OPTIONS = (
    "mini_batches", "epochs", "micro_batch_size", "micro_batch_tokens", "kl_coef", "max_grad_norm", "aggregation",
    "max_new_tokens",
)  # fmt: skip
"""The module options :func:`check_options` takes, by name."""


def check_options(
    mini_batches: int,
    epochs: int,
    micro_batch_size: int | None,
    micro_batch_tokens: int | None,
    kl_coef: float,
    max_grad_norm: float | None,
    aggregation: str,
    max_new_tokens: int | None,
) -> None:
    """Refuse option values that would train silently wrong, each with one line naming the fix.

    Raises:
        ValueError: counts below 1; ``kl_coef < 0`` (a reward for drifting from the reference, loss or reward);
            ``max_grad_norm <= 0`` (clipping to a negative norm flips the gradient: gradient ascent; 0 freezes
            training); ``seq-mean-token-sum-norm`` without ``max_new_tokens`` (its T_max must be one constant on
            every micro-batch and rank, not each one's padded width).
    """
    if mini_batches < 1 or epochs < 1:
        raise ValueError(f"mini_batches and epochs must be >= 1, got {mini_batches} and {epochs}.")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}.")
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1 or None, got {micro_batch_tokens}.")
    if kl_coef < 0:
        raise ValueError(f"model.kl_coef={kl_coef} rewards drifting away from the reference: use 0 (off) or > 0.")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(
            f"model.max_grad_norm={max_grad_norm}: clipping needs a positive norm (a negative one reverses the"
            " gradient, 0 freezes training). Use a positive value, or null for no clipping."
        )
    if aggregation == "seq-mean-token-sum-norm" and max_new_tokens is None:
        raise ValueError(
            "model.aggregation=seq-mean-token-sum-norm divides by a constant T_max: set model.max_new_tokens (the"
            " CLI links it to data.sampling.max_new_tokens)."
        )


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


def has_dropout(model: nn.Module) -> bool:
    """Whether some dropout of ``model`` is active in train mode (see :func:`set_dropout_to_zero`)."""
    for module in model.modules():
        if isinstance(module, _DropoutNd) and module.p > 0:
            return True
        if any(n.endswith("dropout") and isinstance(v, float) and v > 0 for n, v in vars(module).items()):
            return True
    return False


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
            "model.disable_dropout=false and the policy has active dropout: pi_old is computed without it, the"
            " update with it, so ratios differ from 1 at identical weights and clipping fires at random.",
            stacklevel=2,
        )
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def replay_mode(routing_replay: ReplayMode | bool) -> ReplayMode:
    """``model.routing_replay`` as one of ``"off" | "old" | "rollout"`` (``true`` is ``"old"``, ``false`` ``"off"``).

    Raises:
        ValueError: any other value.
    """
    if isinstance(routing_replay, bool):
        return "old" if routing_replay else "off"
    if routing_replay not in ("off", "old", "rollout"):
        raise ValueError(
            f"model.routing_replay={routing_replay!r}: use off, old (pi_old's routes, R2) or rollout (the engine's"
            " routes, R3)."
        )
    return routing_replay


def routing_controller(
    policy: nn.Module, moe: MoELayout | None, replay: ReplayMode, track: bool, aux_loss_coef: float
) -> RoutingController | None:
    """The policy's routing controller when replay or a routing metric (``track``) needs one, else None.

    Raises:
        ValueError: an MoE option was set for a dense model, or replay would change this model's routing
            (record-then-replay on a small input is checked to be the identity, router by router).
    """
    if moe is None:
        if aux_loss_coef > 0:
            raise ValueError("router_aux_loss_coef > 0, but the model is not a mixture of experts.")
        if replay != "off":
            raise ValueError(f"routing_replay={replay}, but the model is not a mixture of experts.")
        return None
    if replay == "off" and not track:
        return None
    controller = RoutingController(policy)
    failed = controller.routers_replay_unchanged() if replay != "off" else []
    if failed:
        raise ValueError(
            f"routing_replay: replaying a model's own routing changes it for {failed[0]}"
            f"{f' and {len(failed) - 1} more' if len(failed) > 1 else ''}: replay recomputes routing weights as a"
            " softmax over the chosen experts, which this router does not use. Set model.routing_replay: off."
        )
    return controller


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
