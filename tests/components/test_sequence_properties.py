"""Hypothesis properties of the sequence ratio."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo_lightning import SequenceRatio


@settings(max_examples=50, deadline=None)
@given(length=st.integers(1, 40), per_token=st.floats(-2, 2), extra_pad=st.integers(0, 10))
def test_constant_per_token_ratio_gives_same_sequence_ratio_at_any_length(length, per_token, extra_pad):
    t = length + extra_pad
    old = torch.full((1, t), -1.0)
    lp = old + per_token
    mask = torch.arange(t)[None, :] < length
    out = SequenceRatio()(lp, old, mask)
    torch.testing.assert_close(out[0, 0], torch.tensor(per_token, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 8), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    pad=st.integers(1, 5),
)
def test_sequence_ratio_ignores_padding_contents_and_width(lengths, seed, pad):
    g = torch.Generator().manual_seed(seed)
    n, t = len(lengths), 8
    lp, old = torch.randn(n, t, generator=g), torch.randn(n, t, generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    a = SequenceRatio()(lp, old, mask)
    junk = torch.full((n, t + pad), float("-inf"))
    lp2, old2 = junk.clone(), junk.clone()
    lp2[:, :t] = torch.where(mask, lp, float("nan"))
    old2[:, :t] = torch.where(mask, old, float("-inf"))
    mask2 = torch.cat([mask, torch.zeros(n, pad, dtype=torch.bool)], 1)
    b = SequenceRatio()(lp2, old2, mask2)
    torch.testing.assert_close(a, b[:, :t])
    assert torch.isfinite(b).all()
