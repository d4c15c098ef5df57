"""Ratios against hand-worked examples and the definitions in docs/algorithms.md#ratios."""

import math

import pytest
import torch

from gspo_lightning import PPOClip, SequenceRatio, SequenceTokenRatio, TokenRatio

# A response of 4 tokens plus one pad, and a second response of 3 tokens.
LP = torch.tensor([[-2.0, -1.8, -1.5, -1.2, 0.0], [-1.9, -1.6, -1.3, 0.0, 0.0]])
OLD = torch.tensor([[-2.2, -2.0, -1.6, -1.3, 0.0], [-2.1, -1.8, -1.5, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)


def test_sequence_log_ratio_is_the_mean_token_delta():
    # deltas (0.2, 0.2, 0.1, 0.1) -> (0.2+0.2+0.1+0.1)/4 = 0.15; second: (0.2+0.2+0.2)/3 = 0.2
    out = SequenceRatio()(LP, OLD, MASK)
    expected = torch.tensor([[0.15, 0.15, 0.15, 0.15, 0.0], [0.2, 0.2, 0.2, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_gspo_token_has_same_value():
    torch.testing.assert_close(SequenceTokenRatio()(LP, OLD, MASK), SequenceRatio()(LP, OLD, MASK))


def test_token_ratio_is_delta_and_zero_at_padding():
    out = TokenRatio()(LP, OLD, MASK)
    expected = torch.tensor([[0.2, 0.2, 0.1, 0.1, 0.0], [0.2, 0.2, 0.2, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_hello_world_clips_to_1_2():
    # "Hello world": p_old = (0.20, 0.10), p_new = (0.25, 0.30): token ratios 1.25 and 3.0.
    lp = torch.log(torch.tensor([[0.25, 0.30]]))
    old = torch.log(torch.tensor([[0.20, 0.10]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.tensor([1.0])
    clip = PPOClip(0.2, 0.2)
    token = clip(TokenRatio()(lp, old, mask), adv)
    torch.testing.assert_close(token.ratio, torch.tensor([[1.25, 3.0]]))
    # both exceed 1 + 0.2 with A > 0: the loss is -1.2 * A on each token, and both count as clipped high
    torch.testing.assert_close(token.loss, torch.tensor([[-1.2, -1.2]]))
    assert token.clipped_high.all()
    # un-normalised sequence ratio: 0.25*0.30 / (0.20*0.10) = 3.75 -> clipped to 1.2
    seq = clip(SequenceRatio(length_normalize=False)(lp, old, mask), adv)
    torch.testing.assert_close(seq.ratio[0, 0], torch.tensor(3.75))
    torch.testing.assert_close(seq.loss, torch.tensor([[-1.2, -1.2]]))
    # the GSPO (normalised) ratio is the geometric mean sqrt(3.75) = 1.9365, also clipped at 1.2
    gspo = clip(SequenceRatio()(lp, old, mask), adv)
    torch.testing.assert_close(gspo.ratio[0, 0], torch.tensor(math.sqrt(3.75)))


@pytest.mark.parametrize("length", [1, 3, 10, 50])
def test_geometric_mean_is_length_independent(length):
    # every token goes 0.3 -> 0.4: the full ratio is (4/3)^L, its L-th root 1.333 at any L
    lp = torch.full((1, length), math.log(0.4))
    old = torch.full((1, length), math.log(0.3))
    mask = torch.ones(1, length, dtype=torch.bool)
    ratio = SequenceRatio()(lp, old, mask).exp()
    torch.testing.assert_close(ratio, torch.full((1, length), 4 / 3))
    full = SequenceRatio(length_normalize=False)(lp, old, mask).exp()
    torch.testing.assert_close(full[0, 0], torch.tensor((4 / 3) ** length), rtol=1e-4, atol=0)


def test_gspo_token_gradient_flows_per_token():
    lp = LP.clone().requires_grad_(True)
    SequenceTokenRatio()(lp, OLD, MASK).sum().backward()
    # d/dlp_it of sum_t' (sg(s) + lp_it' - sg(lp_it')) = 1 on real tokens, 0 at padding
    torch.testing.assert_close(lp.grad, MASK.float())


def test_sequence_ratio_gradient_is_mean():
    lp = LP.clone().requires_grad_(True)
    SequenceRatio()(lp, OLD, MASK)[:, 0].sum().backward()
    # d log s_i / d lp_it = 1 / L_i
    expected = torch.tensor([[0.25] * 4 + [0.0], [1 / 3] * 3 + [0.0, 0.0]])
    torch.testing.assert_close(lp.grad, expected)
