"""Vectorised masked and grouped reductions shared by the components.

Shapes: N sequences, T response tokens. Masks are boolean (N, T). Every reduction treats masked-out
positions as absent, including when they hold NaN or -inf (they are replaced before any arithmetic).
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_fill_padding(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """``x`` with padding positions set to ``value``; the gradient at padding is zero."""
    return x.masked_fill(~mask.bool(), value)


def seq_lengths(mask: Tensor) -> Tensor:
    """Number of real tokens per sequence, ``L_i = sum_t m_it``. (N, T) -> (N,) float."""
    return mask.to(torch.float32).sum(-1)


def seq_sum(x: Tensor, mask: Tensor) -> Tensor:
    """``sum_t m_it x_it``. (N, T) -> (N,)."""
    return masked_fill_padding(x, mask).sum(-1)


def seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``(1/L_i) sum_t m_it x_it``; 0 for an empty sequence. (N, T) -> (N,)."""
    return seq_sum(x, mask) / seq_lengths(mask).clamp(min=1.0).to(x.dtype)


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group indices 0..K-1 for arbitrary ``group_ids`` (N,), and K."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(x: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Per-group sums of ``x`` (N,) -> (K,)."""
    return torch.zeros(num_groups, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def group_stats(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group mean, unbiased group std and group size, each gathered back to (N,), in float64.

    Computed in float64: a float32 sum of G equal values can be 1 ulp off G times the value (8 x 0.1 is),
    which would give every member of an all-equal group the same non-zero centred reward. In float64 the sum
    of fewer than 2^29 float32 values is exact, so an all-equal group has mean equal to its members and std
    exactly 0. A group of one has std 0 (not NaN): its only member equals its mean.
    """
    index, k = group_index(group_ids)
    x = x.to(torch.float64)
    count = group_sum(torch.ones_like(x), index, k)
    mean = group_sum(x, index, k) / count
    centred = x - mean[index]
    var = group_sum(centred.square(), index, k) / (count - 1).clamp(min=1.0)
    return mean[index], var.sqrt()[index], count[index]


def global_std(x: Tensor) -> Tensor:
    """Unbiased std of ``x`` (N,) over every data-parallel rank, in float64; 0 for fewer than 2 values.

    A collective when ``torch.distributed`` is initialised with more than one rank: every rank must call it.
    """
    stats = torch.stack([x.sum(), x.square().sum(), torch.tensor(float(x.numel()), device=x.device)]).double()
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        torch.distributed.all_reduce(stats)
    total, squares, n = stats.unbind()
    if n < 2:
        return torch.zeros((), dtype=torch.float64, device=x.device)
    return ((squares - total.square() / n).clamp(min=0.0) / (n - 1)).sqrt()
