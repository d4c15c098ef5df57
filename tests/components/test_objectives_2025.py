"""SAPO, CISPO, GMPO in the clip slot: hand-worked values and gradients against independent definitions."""

import math

import pytest
import torch

from gspo_lightning import CISPOClip, GMPOClip, PolicyObjective, SAPOGate, TokenRatio


def _log(*ratios):
    return torch.log(torch.tensor([list(ratios)], dtype=torch.float64)).requires_grad_()


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- SAPO


def test_sapo_values_and_gradients_by_hand():
    # A = 1 (tau_pos = 1): r = 1 -> f = 4 sigmoid(0) = 2, loss -2; r = 2 -> f = 4 sigmoid(1) = 2.9242344
    # d loss / d log r = -A * 4 sigmoid(tau (r-1)) (1 - sigmoid(tau (r-1))) * r: -1 at r = 1, -1.5728954 at r = 2
    log_r = _log(1.0, 2.0)
    out = SAPOGate(1.0, 1.05)(log_r, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor([[-2.0, -2.9242344]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss.sum(), log_r)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.5728954]], dtype=torch.float64))
    assert not out.clipped.any(), "a soft gate clips nothing"


def test_sapo_negative_advantage_uses_tau_neg():
    # A = -1 (tau_neg = 1.05), r = 1: f = (4 / 1.05) * 0.5 = 1.9047619 -> loss +1.9047619; the gradient is +1 (w(1) = 1)
    log_r = _log(1.0)
    out = SAPOGate(1.0, 1.05)(log_r, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor([[4 / 1.05 * 0.5]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss.sum(), log_r)
    torch.testing.assert_close(grad, torch.tensor([[1.0]], dtype=torch.float64))


def _sapo_reference(lp, old, adv, mask, tau_pos, tau_neg):
    """SAPO's objective (arXiv 2511.20347, eq. 5-6) written out per token: -(1/G) sum_i (1/|y_i|) sum_t f(r) A."""
    total = 0.0
    rows = 0
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        rows += 1
        tau = tau_pos if adv[i] > 0 else tau_neg
        seq = 0.0
        for t in range(lp.shape[1]):
            if mask[i, t]:
                r = torch.exp(lp[i, t] - old[i, t])
                seq = seq + torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau * adv[i]
        total = total - seq / n
    return total / rows


def _case():
    g = torch.Generator().manual_seed(3)
    n, t = 5, 6
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    lp = (old + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.arange(t)[None, :] < torch.tensor([6, 3, 1, 0, 4])[:, None]
    adv = torch.tensor([1.5, -0.5, 2.0, 1.0, -1.0], dtype=torch.float64)
    return lp, old, adv, mask


def test_sapo_objective_gradient_equals_its_definition():
    lp, old, adv, mask = _case()
    objective = PolicyObjective(TokenRatio(), SAPOGate(1.0, 1.05), aggregation="seq-mean-token-mean")
    ours = objective(lp, old, adv, mask).loss
    (g_ours,) = torch.autograd.grad(ours, lp)
    ref = _sapo_reference(lp, old, adv, mask, 1.0, 1.05)
    (g_ref,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


# ---------------------------------------------------------------- CISPO


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    # eps_high = 0.2, no lower bound. A = 2, r = 1.5: weight min(1.5, 1.2) = 1.2, loss -1.2 * 2 * log 1.5 = -0.9731163,
    # gradient d/d log r = -2.4 (PPO's would be 0: the token is past the range). r = 0.5: weight 0.5, loss
    # -0.5 * 2 * log 0.5 = 0.6931472, gradient -1.0.
    log_r = _log(1.5, 0.5)
    out = CISPOClip(eps_low=1.0, eps_high=0.2)(log_r, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor([[-2.4 * math.log(1.5), -math.log(0.5)]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss.sum(), log_r)
    torch.testing.assert_close(grad, torch.tensor([[-2.4, -1.0]], dtype=torch.float64))
    assert out.clipped_high.tolist() == [[True, False]] and not out.clipped_low.any()


def test_cispo_lower_bound():
    # eps_low = 0.2: r = 0.5 -> weight 0.8; A = -1: loss -0.8 * -1 * log 0.5 = -0.5545177, gradient +0.8
    log_r = _log(0.5)
    out = CISPOClip(eps_low=0.2, eps_high=0.2)(log_r, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(out.loss, torch.tensor([[0.8 * math.log(0.5)]], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss.sum(), log_r)
    torch.testing.assert_close(grad, torch.tensor([[0.8]], dtype=torch.float64))
    assert out.clipped_low.all()


def test_cispo_objective_gradient_equals_its_definition():
    # MiniMax-M1 eq. 4: -(1 / sum_i |o_i|) sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high)) A_i log pi(o_it)
    lp, old, adv, mask = _case()
    objective = PolicyObjective(TokenRatio(), CISPOClip(1.0, 0.3), aggregation="token-mean")
    (g_ours,) = torch.autograd.grad(objective(lp, old, adv, mask).loss, lp)
    weight = torch.exp(lp - old).detach().clamp(0.0, 1.3)
    ref = -(weight * adv[:, None] * lp)[mask].sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(g_ours, g_ref)


# ---------------------------------------------------------------- GMPO


def test_gmpo_values_and_gradient_by_hand():
    # log ratios (0.1, 0.6, -0.7), eps 0.4. A = 1: token PPO-min in log space -> (0.1, 0.4, -0.7), mean -0.2/3,
    # loss -exp(-0.0666667) = -0.9355070 on every token; d l / d delta = -exp(mean) / 3 where the clamp did not act:
    # (-0.3118357, 0, -0.3118357). A = -1: max instead -> (0.1, 0.6, -0.4), mean 0.1, loss +exp(0.1).
    delta = torch.tensor([[0.1, 0.6, -0.7]], dtype=torch.float64, requires_grad=True)
    pos = GMPOClip(0.4, 0.4)(delta, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(pos.loss[0], torch.full((3,), -math.exp(-0.2 / 3), dtype=torch.float64))
    (grad,) = torch.autograd.grad(pos.loss[0, 0], delta)
    e = math.exp(-0.2 / 3) / 3
    torch.testing.assert_close(grad, torch.tensor([[-e, 0.0, -e]], dtype=torch.float64))
    assert pos.clipped_high.tolist() == [[False, True, False]] and not pos.clipped_low.any()
    neg = GMPOClip(0.4, 0.4)(delta, torch.tensor([-1.0], dtype=torch.float64))
    torch.testing.assert_close(neg.loss[0], torch.full((3,), math.exp(0.1), dtype=torch.float64))
    assert neg.clipped_low.tolist() == [[False, False, True]]


def test_gmpo_objective_gradient_equals_its_definition():
    # arXiv 2507.20673 eq. 4, per sequence: -(1/G) sum_i A_i prod_t min(r A, clip(r) A)^(1/|o_i|) / A_i, signed
    lp, old, adv, mask = _case()
    objective = PolicyObjective(TokenRatio(), GMPOClip(0.4, 0.4), aggregation="seq-mean-token-mean")
    ours = objective(lp, old, adv, mask).loss
    (g_ours,) = torch.autograd.grad(ours, lp)
    terms, rows = [], 0
    for i in range(lp.shape[0]):
        n = int(mask[i].sum())
        if n == 0:
            continue
        rows += 1
        product = 1.0
        for t in range(n):
            r = torch.exp(lp[i, t] - old[i, t])
            clipped = r.clamp(math.exp(-0.4), math.exp(0.4))
            product = product * torch.minimum(r * adv[i], clipped * adv[i]).abs() ** (1.0 / n)
        terms.append(-torch.sign(adv[i]) * product)
    ref = sum(terms) / rows
    (g_ref,) = torch.autograd.grad(ref, lp)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("clip", [SAPOGate(), CISPOClip(), GMPOClip()])
def test_extreme_log_ratios_are_bounded(clip):
    log_ratio = torch.tensor([[100.0, -100.0]], requires_grad=True)
    out = clip(log_ratio, torch.tensor([1.0]))
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(log_ratio.grad).all()


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="tau_pos > 0"):
        SAPOGate(tau_pos=0.0)
    with pytest.raises(ValueError, match="eps_low in"):
        CISPOClip(eps_low=1.5)
    with pytest.raises(ValueError, match="eps_low >= 0"):
        GMPOClip(eps_low=-0.1)
