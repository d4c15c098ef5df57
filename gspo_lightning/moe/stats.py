"""Router statistics of an MoE policy over a rollout batch: expert load, load imbalance, router entropy.

Router logits come from transformers' MoE models (``output_router_logits=True``): one (S, E) tensor per
MoE layer over the S flattened token positions of a forward. :class:`RouterStats` sums over every
micro-batch of a rollout batch, so the figures describe all of its tokens, not the last micro-batch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RouterStatsResult:
    """Router statistics of one rollout batch (what the module hands to callbacks in ``outputs``).

    Attributes:
        load: (L, E) fraction of routed slots per expert per layer (rows sum to 1).
        load_imbalance: (L,) max load / mean load (1 is perfectly balanced).
        router_entropy: (L,) mean entropy of the router distribution over real tokens, in nats.
        rollout_mismatch: (L,) fraction of the response's (position, layer) pairs whose top-k expert set the
            trainer's router chose differently from the rollout engine (``moe.routing.rollout_mismatch_counts``),
            or None when the engine reported no routes.
        rollout_unrouted_frac: fraction of response positions the engine reported no route for, or None.
    """

    load: Tensor
    load_imbalance: Tensor
    router_entropy: Tensor
    rollout_mismatch: Tensor | None = None
    rollout_unrouted_frac: float | None = None


class RouterStats:
    """Accumulates expert counts and router entropies over the forwards of one rollout batch.

    Args:
        top_k: experts chosen per token.
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self._counts: Tensor | None = None  # (L, E) routed slots per expert
        self._entropy: Tensor | None = None  # (L,) summed entropy over real tokens
        self._tokens = 0.0
        self._mismatch: Tensor | None = None  # (L,) differing (position, layer) pairs
        self._routed = self._unrouted = 0.0

    def add(self, router_logits: tuple[Tensor, ...], token_mask: Tensor) -> None:
        """Add one forward's routing.

        Args:
            router_logits: per MoE layer, (S, E) logits; S = n * seq_len flattened positions.
            token_mask: (n, seq_len) bool, real tokens.
        """
        mask = token_mask.reshape(-1).bool()
        counts, entropy = [], []
        for layer in router_logits:  # one small (S', E) tensor at a time, never an (L, S, E) stack
            logits = layer.detach().float()[mask.to(layer.device)]
            chosen = torch.topk(logits, self.top_k, dim=-1).indices.flatten()
            counts.append(torch.bincount(chosen, minlength=logits.shape[-1]).float())
            entropy.append(torch.special.entr(torch.softmax(logits, dim=-1)).sum())
        counts_t, entropy_t = torch.stack(counts).cpu(), torch.stack(entropy).cpu()
        self._counts = counts_t if self._counts is None else self._counts + counts_t
        self._entropy = entropy_t if self._entropy is None else self._entropy + entropy_t
        self._tokens += float(mask.sum())

    def add_rollout_mismatch(self, differing: Tensor, routed: Tensor, unrouted: Tensor) -> None:
        """Add the counts of :func:`~gspo_lightning.moe.routing.rollout_mismatch_counts` for some sequences."""
        differing = differing.detach().float().cpu()
        self._mismatch = differing if self._mismatch is None else self._mismatch + differing
        self._routed += float(routed)
        self._unrouted += float(unrouted)

    def result(self) -> RouterStatsResult | None:
        """The statistics of everything added so far, or None when nothing was."""
        if self._counts is None or self._entropy is None:
            return None
        load = self._counts / self._counts.sum(-1, keepdim=True).clamp(min=1)
        return RouterStatsResult(
            load=load,
            load_imbalance=load.max(-1).values * load.shape[-1],
            router_entropy=self._entropy / max(self._tokens, 1.0),
            rollout_mismatch=None if self._mismatch is None else self._mismatch / max(self._routed, 1.0),
            rollout_unrouted_frac=(
                None if self._mismatch is None else self._unrouted / max(self._routed + self._unrouted, 1.0)
            ),
        )
