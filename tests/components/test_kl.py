"""KL estimators k1, k2, k3."""

import math

import pytest
import torch

from gspo_lightning import K1KL, K2KL, K3KL, PolicyObjective, PPOClip, TokenRatio


def test_values():
    lp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    d = math.log(2.0)  # lp - ref
    torch.testing.assert_close(K1KL()(lp, ref), torch.tensor([[d]]))
    torch.testing.assert_close(K2KL()(lp, ref), torch.tensor([[0.5 * d * d]]))
    # k3 = exp(ref - lp) - (ref - lp) - 1 = 0.5 + ln 2 - 1
    torch.testing.assert_close(K3KL()(lp, ref), torch.tensor([[0.5 + d - 1.0]]))


def test_zero_when_equal_and_k3_nonnegative():
    lp = torch.randn(4, 6)
    for kl in (K1KL(), K2KL(), K3KL()):
        torch.testing.assert_close(kl(lp, lp), torch.zeros(4, 6))
    assert (K3KL()(lp, torch.randn(4, 6)) >= 0).all()


def test_k3_is_finite_for_extreme_gaps():
    lp = torch.tensor([[0.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-100.0, 0.0]])
    out = K3KL()(lp, ref)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lp.grad).all()


def test_k3_is_clamped_at_its_output():
    # ref - lp = 29: exp(20) - 20 - 1 = 4.85e8 with the input clamp alone; the output clamp caps it at 10
    lp, ref = torch.tensor([[-30.0, -1.0]], requires_grad=True), torch.tensor([[-1.0, -1.0]])
    kl = K3KL()(lp, ref)
    assert kl[0, 0].item() == 10.0 and kl[0, 1].item() == 0.0
    assert K3KL(max_value=None)(lp, ref)[0, 0].item() == pytest.approx(math.exp(20) - 21, rel=1e-6)
    kl.sum().backward()
    assert lp.grad[0, 0].item() == 0.0  # beyond the clamp a single token no longer drives the gradient


def test_k1_in_the_loss_warns_that_its_gradient_is_zero_in_expectation():
    with pytest.warns(UserWarning, match="zero expected gradient"):
        PolicyObjective(TokenRatio(), PPOClip(0.2, 0.2), kl=K1KL(), kl_coef=0.1)
