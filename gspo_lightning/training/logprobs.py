"""Log-probs (and entropies) of the sampled response tokens under a causal LM.

One forward pass over ``[prompt | response]``; only the T + 1 last positions' logits are materialised
(``logits_to_keep``), so memory scales with the response, not the prompt. Logits are divided by the
sampling temperature so the log-probs are those of the distribution the engine sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TokenLogprobs:
    """Output of :func:`response_logprobs`.

    Attributes:
        logprobs: (N, T) log-probs of the response tokens.
        entropy: (N, T) entropy of the (temperature-scaled) next-token distribution, or None.
        router_logits: per-layer router logits of an MoE model (each (N*(P+T), E)), or None.
        aux_loss: the MoE model's load-balancing loss when router logits were requested, else None.
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None
    aux_loss: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them. (N, S) -> (N, S)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    output_router_logits: bool = False,
) -> TokenLogprobs:
    """Log-probs of ``input_ids[:, -T:]`` given everything before them.

    Args:
        model: a causal LM returning ``.logits`` (N, S', V).
        input_ids: (N, P+T) prompt and response tokens.
        attention_mask: (N, P+T) bool or int.
        response_width: T.
        temperature: the sampling temperature (logits are divided by it).
        with_entropy: also return the per-token entropy.
        entropy_grad: keep the entropy in the autograd graph (for an entropy bonus); otherwise it is
            computed without gradient, which saves a (N, T, V) activation.
        output_router_logits: ask an MoE model for its router logits.
    """
    t = response_width
    kwargs = {"output_router_logits": True} if output_router_logits else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=t + 1,
        use_cache=False,
        **kwargs,
    )
    # logits at position j predict token j+1: the last T+1 positions predict the T response tokens (+1 extra)
    logits = out.logits[:, -(t + 1) : -1].float() / temperature  # (N, T, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, -t:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    router = getattr(out, "router_logits", None) if output_router_logits else None
    aux = getattr(out, "aux_loss", None) if output_router_logits else None
    return TokenLogprobs(logprobs=logprobs, entropy=entropy, router_logits=router, aux_loss=aux)
