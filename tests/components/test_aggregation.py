"""Aggregation modes and their exactness across micro-batches and ranks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo_lightning import AGGREGATION_MODES, LossCounts, aggregate

# two sequences: lengths 2 and 1; losses (1, 3) and (5); a padded third column holding NaN
VALUES = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("nan"), float("nan")]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 3 + 5) / 3),  # 3.0
        ("seq-mean-token-mean", ((1 + 3) / 2 + 5 / 1) / 2),  # 3.5
        ("seq-mean-token-sum", ((1 + 3) + 5) / 2),  # 4.5
        ("seq-mean-token-sum-norm", (1 + 3 + 5) / (2 * 3)),  # 1.5 with T_max = 3
    ],
)
def test_modes_hand_worked(mode, expected):
    torch.testing.assert_close(aggregate(VALUES, MASK, mode), torch.tensor(expected))


def test_token_sum_norm_uses_constant_max_len():
    torch.testing.assert_close(aggregate(VALUES, MASK, "seq-mean-token-sum-norm", max_len=10), torch.tensor(9 / 20))


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        aggregate(VALUES, MASK, "mean")


def test_empty_batch_is_zero_not_nan():
    values = torch.randn(2, 3, requires_grad=True)
    for mode in AGGREGATION_MODES:
        out = aggregate(values, torch.zeros(2, 3, dtype=torch.bool), mode)
        out.backward()
        assert out.item() == 0.0 and torch.isfinite(values.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=2, max_size=10),
    splits=st.integers(1, 4),
    mode=st.sampled_from(AGGREGATION_MODES),
    seed=st.integers(0, 2**16),
)
def test_micro_batches_with_global_counts_equal_whole_batch(lengths, splits, mode, seed):
    g = torch.Generator().manual_seed(seed)
    n, t = len(lengths), 7
    values = torch.randn(n, t, generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    whole = aggregate(values, mask, mode, max_len=t)
    counts = LossCounts.from_mask(mask)
    parts = [
        aggregate(values[idx], mask[idx], mode, counts=counts, max_len=t)
        for idx in torch.tensor_split(torch.randperm(n, generator=g), splits)
    ]
    torch.testing.assert_close(torch.stack(parts).sum(), whole, rtol=1e-5, atol=1e-6)


def test_counts_skip_empty_sequences():
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    assert LossCounts.from_mask(mask) == LossCounts(num_tokens=3.0, num_seqs=2.0)
