"""Loading the models the trainer runs: the policy, the frozen reference, and the policy's MoE wiring."""

from __future__ import annotations

from torch import nn

from gspo_lightning.models import DType, load_causal_lm
from gspo_lightning.moe.layout import MoELayout
from gspo_lightning.moe.routing import RoutingController


def load_policy(
    model: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """The policy in train mode, without KV cache (training forwards never reuse one)."""
    policy = load_causal_lm(model, dtype, trust_remote_code, attn_implementation)
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    return policy.train()  # from_pretrained returns eval mode


def load_reference(
    model: str, dtype: DType = "float32", trust_remote_code: bool = False, attn_implementation: str | None = None
) -> nn.Module:
    """The frozen reference model pi_ref (eval mode, no gradient)."""
    return load_causal_lm(model, dtype, trust_remote_code, attn_implementation).eval().requires_grad_(False)


def routing_controller(
    policy: nn.Module, moe: MoELayout | None, replay: bool, track_change: bool, aux_loss_coef: float
) -> RoutingController | None:
    """The policy's routing controller when replay or the routing-change metric needs one, else None.

    Raises:
        ValueError: an MoE option was set for a dense model.
    """
    if moe is None:
        if aux_loss_coef > 0:
            raise ValueError("router_aux_loss_coef > 0, but the model is not a mixture of experts.")
        if replay:
            raise ValueError("routing_replay=True, but the model is not a mixture of experts.")
        return None
    return RoutingController(policy) if replay or track_change else None
