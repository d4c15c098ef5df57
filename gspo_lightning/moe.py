"""Mixture-of-experts helpers: detecting MoE configs and router statistics (``moe/*`` metrics).

Router logits come from transformers' MoE models (``output_router_logits=True``): one (S, E) tensor per
MoE layer over the S flattened token positions of the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


def moe_layout(config) -> tuple[int, int] | None:
    """``(num_experts, experts_per_token)`` of an MoE config, or None for a dense model."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        return int(experts), int(top_k)
    return None


def router_stats(router_logits: tuple[Tensor, ...], token_mask: Tensor, top_k: int) -> dict[str, Tensor]:
    """Per-layer expert load and its summaries over the real tokens.

    Args:
        router_logits: per MoE layer, (S, E) logits; S = N * seq_len flattened positions.
        token_mask: (N, seq_len) bool, real tokens.
        top_k: experts chosen per token.

    Returns:
        ``moe/load`` (L, E): fraction of routed slots per expert per layer (rows sum to 1);
        ``moe/load_imbalance`` (L,): max load / mean load (1 is perfectly balanced);
        ``moe/router_entropy`` (L,): mean entropy of the router distribution, in nats.
    """
    mask = token_mask.reshape(-1).bool()
    logits = torch.stack([layer.detach().float() for layer in router_logits])[:, mask]  # (L, S', E)
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)
    chosen = torch.topk(logits, top_k, dim=-1).indices  # (L, S', k)
    counts = torch.zeros(logits.shape[0], num_experts, device=logits.device)
    counts.scatter_add_(1, chosen.flatten(1), torch.ones_like(chosen.flatten(1), dtype=counts.dtype))
    load = counts / counts.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1).mean(-1)
    return {
        "moe/load": load,
        "moe/load_imbalance": load.max(-1).values * num_experts,
        "moe/router_entropy": entropy,
    }
