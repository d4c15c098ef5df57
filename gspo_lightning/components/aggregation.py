"""Loss aggregation: per-token losses (N, T) to one scalar, exact across micro-batches and ranks.

Modes (names as in verl), with ``m`` the response mask, ``L_i`` the response lengths, ``N'`` the number of
non-empty sequences, ``T_max`` a constant length:

- ``token-mean``: ``sum(m l) / sum(m)`` (DAPO, arXiv 2503.14476 eq. 12).
- ``seq-mean-token-mean``: ``(1/N') sum_i (1/L_i) sum_t m_it l_it`` (GRPO's and GSPO's, each sequence
  counts once whatever its length).
- ``seq-mean-token-sum``: ``(1/N') sum_i sum_t m_it l_it``.
- ``seq-mean-token-sum-norm``: ``sum(m l) / (N' T_max)`` (Dr. GRPO, arXiv 2503.20783).

Every formula is a sum of per-sequence terms divided by a batch-wide count. When a batch is split into
micro-batches (gradient accumulation) or over data-parallel ranks, pass the *global* counts
(:class:`LossCounts` of the whole batch): each part then returns its share, and the shares add up to the
whole-batch value exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from gspo_lightning.ops import masked_fill_padding, seq_lengths

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGGREGATION_MODES: tuple[str, ...] = get_args(AggregationMode)


@dataclass(frozen=True)
class LossCounts:
    """The denominators of the aggregation formulas for one whole (global) batch.

    Attributes:
        num_tokens: ``sum(m)``, real response tokens.
        num_seqs: ``N'``, sequences with at least one response token.
    """

    num_tokens: float
    num_seqs: float

    @classmethod
    def from_mask(cls, response_mask: Tensor) -> LossCounts:
        lengths = seq_lengths(response_mask)
        return cls(num_tokens=float(lengths.sum()), num_seqs=float((lengths > 0).sum()))


def check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"Unknown aggregation {mode!r}. Valid modes: {', '.join(AGGREGATION_MODES)}.")


def aggregate(
    values: Tensor,
    response_mask: Tensor,
    mode: AggregationMode = "token-mean",
    counts: LossCounts | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Aggregate per-token ``values`` (N, T) to a scalar.

    Args:
        values: (N, T) per-token values; padding may hold anything, even NaN.
        response_mask: (N, T) bool.
        mode: one of :data:`AGGREGATION_MODES`.
        counts: global denominators; None means this batch is the whole batch.
        max_len: ``T_max`` for ``seq-mean-token-sum-norm``; defaults to the padded width T, which is only
            constant across micro-batches if they share it, so pass the generation limit when splitting.

    Returns:
        A scalar. With ``counts`` of a whole batch, the sum of the results over its parts equals the result
        on the whole batch. With no real token it is 0 (and still differentiable).
    """
    check_mode(mode)
    mask = response_mask.bool()
    counts = counts or LossCounts.from_mask(mask)
    values = masked_fill_padding(values, mask)
    if mode == "token-mean":
        return values.sum() / max(counts.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = values.sum(-1) / seq_lengths(mask).clamp(min=1.0).to(values.dtype)
        return per_seq.sum() / max(counts.num_seqs, 1.0)
    if mode == "seq-mean-token-sum":
        return values.sum() / max(counts.num_seqs, 1.0)
    t_max = max_len if max_len is not None else mask.shape[-1]
    return values.sum() / (max(counts.num_seqs, 1.0) * max(t_max, 1))


def masked_metric_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean over real tokens, for metrics."""
    mask = mask.bool()
    return (masked_fill_padding(values.detach(), mask).sum() / mask.sum().clamp(min=1)).to(torch.float32)
