"""Log-probs (and entropies) of the sampled response tokens under a causal LM, in bounded memory.

One forward pass over ``[prompt | response]``. The decoder runs as usual; the output projection (the "head")
is computed over chunks of at most ``chunk_size`` response tokens, each chunk's ``(chunk, V)`` logits
recomputed in backward (activation checkpointing) instead of kept, so the extra memory is O(chunk x V)
whatever N and T are: no full-vocabulary ``(N, T, V)`` tensor is ever materialised (at a 151,936-token
vocabulary one such fp32 tensor of 4 x 4,096 tokens is 10 GiB). Only real response tokens go through the
head; padding gets log-prob and entropy 0.

Padding-free packing (``padding_free=True``): the real tokens of all N rows go into one row of L tokens,
position ids restarting at 0 for each sequence and no attention mask; transformers then builds a
block-causal mask from the position ids (sdpa, eager, flex) or runs flash-attention's variable-length kernel,
so no compute is spent on padding and each sequence sees only itself. Results come back in the ``(N, T)``
layout, equal to the padded path's to float tolerance.

Logits are divided by the sampling temperature so the log-probs are those of the distribution the engine
sampled from: ``log p(y_t) = z_y / tau - logsumexp(z / tau)``, ``H_t = logsumexp(z / tau) - sum_v p_v z_v / tau``.

The head is swapped into the model for the duration of the forward (``set_output_embeddings``), so it runs
inside the model's own forward and is called as a module: FSDP2 and DeepSpeed ZeRO-3 have its weight
gathered there, as for the model's own ``lm_head``. What the model's forward does to the head's output
(soft-capping, a multiplier, scaling) the chunked head would skip, so it is checked once at setup
(:func:`verify_chunked_head`: chunked against full-vocabulary log-probs on a probe batch); a model that fails
the check, or whose config names such a transform, falls back to its own logits, with one log line.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
"""Response tokens per chunk of the head: (256, 151,936) fp32 is 155 MiB per temporary; at Qwen's vocabulary
a training micro-step of 8 x 512 tokens peaked at 1.6 GiB with it, 3.8 GiB with 1,024 (benchmarks/RESULTS.md)."""

# config attributes (top level or text_config) that transform logits after the output projection: Gemma's
# soft-capping, Cohere's logit_scale, Granite's logits_scaling, FalconH1's lm_head_multiplier; the setup probe
# (verify_chunked_head) catches the transforms no attribute names
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier",
)  # fmt: skip
_PROBE_SHAPE = (2, 8)  # sequences x tokens of the setup probe; its last half is the response


@dataclass
class TokenLogprobs:
    """Output of :func:`response_logprobs`.

    Attributes:
        logprobs: (N, T) log-probs of the response tokens (0 at padding).
        entropy: (N, T) entropy of the (temperature-scaled) next-token distribution (0 at padding), or None.
        router_logits: per-layer router logits of an MoE model (each (N*(P+T), E)), or None.
        aux_loss: the MoE model's load-balancing loss when router logits were requested, else None.
        router_token_mask: which rows of each router-logit tensor are real tokens (the attention mask, or all
            of them when packed).
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    router_logits: tuple[Tensor, ...] | None = None
    aux_loss: Tensor | None = None
    router_token_mask: Tensor | None = None


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` uses them. (N, S) -> (N, S)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class _Layout:
    """How the model is called and where each response token's predicting hidden state lands.

    ``rows`` (N, T): for response token j of sequence i, the row of the flattened ``(batch, positions)``
    hidden states that predicts it (any valid row at padding, masked out later).
    """

    input_ids: Tensor
    attention_mask: Tensor | None
    position_ids: Tensor
    logits_to_keep: int
    rows: Tensor


def _padded_layout(input_ids: Tensor, attention_mask: Tensor, t: int) -> _Layout:
    # the model keeps the last T+1 positions: position j of those predicts response token j
    n = input_ids.shape[0]
    rows = torch.arange(n, device=input_ids.device)[:, None] * (t + 1) + torch.arange(t, device=input_ids.device)
    positions = position_ids_from_mask(attention_mask)
    return _Layout(input_ids, attention_mask.long(), positions, t + 1, rows)


def _packed_layout(input_ids: Tensor, attention_mask: Tensor, t: int) -> _Layout:
    # real tokens in row-major order: each sequence's prompt then its response, sequences one after another
    real = attention_mask.bool()
    packed_pos = real.flatten().long().cumsum(0).reshape(real.shape) - 1  # (N, S) index in the packed row
    rows = (packed_pos[:, input_ids.shape[1] - t :] - 1).clamp(min=0)  # the position before each response token
    positions = position_ids_from_mask(attention_mask)[real]
    return _Layout(input_ids[real][None], None, positions[None], 0, rows)


def _head_chunk(
    head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float, entropy: bool, entropy_grad: bool
) -> tuple[Tensor, Tensor]:
    """Log-probs of ``targets`` and entropies for a chunk of C hidden states. (C, H) -> (C,), (C,)."""
    logits = head(hidden).float() / temperature  # (C, V), freed when the chunk is done
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not entropy:
        return logprobs, logprobs.new_zeros(())
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, ent


class ChunkedLogprobHead(nn.Module):
    """Stands in for a causal LM's output projection and returns per-token log-probs instead of logits.

    Called by the model's forward with its kept hidden states; ``rows`` (N, T) says which flattened row
    predicts each response token (``_Layout``). Returns ``(N, T, 2)``: the sampled tokens' log-probs and the
    entropies. The wrapped head (``stands_in_for``) is not registered as a submodule, so the model's
    parameters and state dict are unchanged while it stands in; what walks the module tree (peft's
    ``disable_adapter()``) does not reach it (:class:`~gspo_lightning.adapters.AdapterDisabled` does).

    Args:
        head: the model's output projection (``get_output_embeddings()``).
        rows: (N, T) rows of the flattened hidden states that predict the response tokens.
        targets: (N, T) the response tokens.
        mask: (N, T) bool, real response tokens.
        temperature: the sampling temperature.
        chunk_size: response tokens per chunk.
        entropy: also compute entropies; ``entropy_grad``: with gradient.
    """

    def __init__(
        self,
        head: nn.Module,
        rows: Tensor,
        targets: Tensor,
        mask: Tensor,
        temperature: float,
        chunk_size: int,
        entropy: bool,
        entropy_grad: bool,
    ) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the model's module tree stays as it is
        self.rows, self.targets, self.mask = rows, targets, mask.bool()
        self.temperature, self.chunk_size = temperature, chunk_size
        self.entropy, self.entropy_grad = entropy, entropy_grad

    @property
    def stands_in_for(self) -> nn.Module:
        """The output projection this head wraps (outside the model's module tree while it stands in)."""
        return self.head

    def forward(self, hidden: Tensor) -> Tensor:
        real = hidden.flatten(0, 1)[self.rows[self.mask]]  # (R, H) real response positions only
        targets = self.targets[self.mask]  # (R,)
        parts_lp, parts_ent = [], []
        for start in range(0, real.shape[0], self.chunk_size):  # chunks of tokens, not a loop over sequences
            args = (self.head, real[start : start + self.chunk_size], targets[start : start + self.chunk_size])
            args += (self.temperature, self.entropy, self.entropy_grad)
            if torch.is_grad_enabled():
                # the head draws nothing random: no RNG state to stash and set again in backward (setting the
                # process's generator would also disturb a rollout thread sampling from it, data.max_staleness)
                lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                lp, ent = _head_chunk(*args)
            parts_lp.append(lp)
            parts_ent.append(ent if self.entropy else lp.new_zeros(lp.shape))
        n, t = self.mask.shape
        out = hidden.new_zeros(n, t, 2, dtype=torch.float32)
        if parts_lp:
            per_token = torch.stack([torch.cat(parts_lp), torch.cat(parts_ent)], dim=-1)  # (R, 2)
            out = out.masked_scatter(self.mask[..., None].expand(n, t, 2), per_token)
        return out


_full_logits: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
"""Output projections whose models compute full logits, with the reason (:func:`verify_chunked_head`); keyed by
the projection, so the policy, a peft wrapper and ``AdapterDisabled`` around it share the verdict."""

_fallback_logged: set[tuple[str, str]] = set()


def _config_transforms(config) -> list[str]:
    """The :data:`_LOGIT_TRANSFORMS` attributes set (not None, not 1) on ``config`` or its text config."""
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    return sorted({name for c in configs for name in _LOGIT_TRANSFORMS if getattr(c, name, None) not in (None, 1.0)})


def _full_logits_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot use the chunked head (None when it can)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module) or not hasattr(model, "set_output_embeddings"):
        return "no plain output projection to chunk"
    if head in _full_logits:
        return _full_logits[head]
    transforms = _config_transforms(getattr(model, "config", None))
    if transforms:
        return f"its config transforms the logits after the output projection ({', '.join(transforms)})"
    return None


def _log_fallback(model: nn.Module, reason: str) -> None:
    key = (type(model).__name__, reason)
    if key not in _fallback_logged:
        _fallback_logged.add(key)
        log.warning(
            "%s: %s: computing full-vocabulary logits instead of chunks of model.batching.logprob_chunk_size"
            " tokens, which needs O(N x T x V) memory.",
            *key,
        )


def mark_full_logits(model: nn.Module, reason: str) -> None:
    """Have every later :func:`response_logprobs` of ``model`` compute full logits (``reason`` is logged once)."""
    _full_logits[model.get_output_embeddings()] = reason


@torch.no_grad()
def verify_chunked_head(model: nn.Module, chunk_size: int | None, device: torch.device | None = None) -> str | None:
    """Check once, at setup, that the chunked head gives ``model``'s own log-probs; returns None when it does, else
    the reason it does not, after :func:`mark_full_logits` (one log line names the reason and the option).

    On a probe batch of 2 x 8 tokens (no gradient, eval mode, training flags restored after), the log-probs of
    :func:`response_logprobs` with ``chunk_size`` are compared with the model's own full-vocabulary ones
    (``chunk_size=None``). Whatever the model's forward does to the head's output (soft-capping, a multiplier,
    scaling, under any config name or none) makes them differ. Tolerance: 1e-4 plus two units in the last place
    of the largest logit in the head's output dtype (a low-precision matmul over another number of rows may
    round a logit one unit differently; a log-prob moves by at most two such units).

    Not run (None) when ``chunk_size`` is None, or when the weights are not there to run a forward (the meta
    device, DeepSpeed ZeRO-3 partitions before its engine exists): the config check alone applies then. Under
    FSDP2 every rank must call it (forwards are collectives).

    Args:
        model: a transformers causal LM, a peft model or ``AdapterDisabled``.
        chunk_size: ``model.batching.logprob_chunk_size``.
        device: where the probe's tokens go (default: the first parameter's device).
    """
    if chunk_size is None:
        return None
    reason = _full_logits_reason(model)
    params = list(model.parameters())
    if reason is not None or not params or any(p.is_meta or hasattr(p, "ds_id") for p in params):
        return reason
    config = getattr(model, "config", None)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", 16)
    n, s = _PROBE_SHAPE
    ids = (torch.arange(n * s, device=device or params[0].device).reshape(n, s) * 7 + 1) % vocab
    mask = torch.ones_like(ids, dtype=torch.bool)
    head_out: list[Tensor] = []  # the head's own output in the full-logits pass: its dtype and scale
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_out.append(out))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        full = response_logprobs(model, ids, mask, s // 2, chunk_size=None).logprobs
        chunked = response_logprobs(model, ids, mask, s // 2, chunk_size=chunk_size).logprobs
    finally:
        hook.remove()
        for module, mode in training.items():
            module.training = mode
    diff = float((chunked - full).abs().max()) if chunked.shape == full.shape else math.inf
    logits = head_out[0] if head_out and isinstance(head_out[0], Tensor) else full.new_zeros(())
    tolerance = 1e-4 + 2 * torch.finfo(logits.dtype).eps * float(logits.abs().max())
    if diff <= tolerance:
        return None
    reason = (
        f"the chunked log-prob head differs from the model's own logits by {diff:.3g} nats on a probe batch (its"
        " forward transforms them after the output projection)"
    )
    mark_full_logits(model, reason)
    _log_fallback(model, reason)
    return reason


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_width: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    output_router_logits: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    padding_free: bool = False,
    loss_mask: Tensor | None = None,
) -> TokenLogprobs:
    """Log-probs of ``input_ids[:, -T:]`` given everything before them.

    Args:
        model: a transformers causal LM.
        input_ids: (N, P+T) prompt and response tokens.
        attention_mask: (N, P+T) bool or int; its last T columns are the response mask.
        response_width: T.
        temperature: the sampling temperature (logits are divided by it).
        with_entropy: also return the per-token entropy.
        entropy_grad: keep the entropy in the autograd graph (for an entropy bonus); otherwise it is computed
            without gradient.
        output_router_logits: ask an MoE model for its router logits.
        chunk_size: response tokens per chunk of the output projection; None computes the model's own
            ``(N, T, V)`` logits at once (the reference implementation, and the fallback).
        padding_free: pack the real tokens into one row (see the module docstring); results keep the
            ``(N, T)`` layout.
        loss_mask: (N, T) the response tokens to score (the sampled ones of a multi-turn trajectory, whose appended
            tool / environment tokens are context only: they are forwarded, but get log-prob and entropy 0 and
            never reach the head); None: every real response token.
    """
    t = response_width
    mask = attention_mask[:, -t:].bool() if t else attention_mask[:, :0].bool()
    if loss_mask is not None:
        mask = mask & loss_mask.bool()
    kwargs = {"output_router_logits": True} if output_router_logits else {}
    reason = _full_logits_reason(model) if chunk_size is not None else None
    if reason is not None:
        _log_fallback(model, reason)
    chunked = chunk_size is not None and reason is None
    layout = (_packed_layout if padding_free else _padded_layout)(input_ids, attention_mask, t)
    targets = input_ids[:, input_ids.shape[1] - t :]
    head = model.get_output_embeddings() if chunked else None
    if chunked:
        args = (temperature, chunk_size, with_entropy, entropy_grad)
        model.set_output_embeddings(ChunkedLogprobHead(head, layout.rows, targets, mask, *args))
    try:
        out = model(
            input_ids=layout.input_ids,
            attention_mask=layout.attention_mask,
            position_ids=layout.position_ids,
            logits_to_keep=layout.logits_to_keep,
            use_cache=False,
            **kwargs,
        )
    finally:
        if chunked:
            model.set_output_embeddings(head)
    router = getattr(out, "router_logits", None) if output_router_logits else None
    aux = getattr(out, "aux_loss", None) if output_router_logits else None
    router_mask = torch.ones(layout.input_ids.numel(), dtype=torch.bool, device=input_ids.device)
    router_mask = router_mask if padding_free else attention_mask.bool()
    moe = {"router_logits": router, "aux_loss": aux, "router_token_mask": router_mask if router else None}
    if chunked:
        per_token = out.logits  # (N, T, 2)
        entropy = per_token[..., 1] if with_entropy else None
        return TokenLogprobs(logprobs=per_token[..., 0], entropy=entropy, **moe)
    logits = out.logits.flatten(0, 1)[layout.rows].float() / temperature  # (N, T, V)
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~mask, 0.0)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = (-(logp_all.exp() * logp_all).sum(-1)).masked_fill(~mask, 0.0)
    return TokenLogprobs(logprobs=logprobs, entropy=entropy, **moe)
