"""Whether a model is a mixture of experts, and its routing shape."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MoELayout:
    """The routing shape of an MoE model.

    Attributes:
        num_experts: E, experts per MoE layer.
        top_k: k, experts each token is routed to.
    """

    num_experts: int
    top_k: int


def moe_layout(config) -> MoELayout | None:
    """The :class:`MoELayout` of a transformers config, or None for a dense model."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        return MoELayout(num_experts=int(experts), top_k=int(top_k))
    return None
