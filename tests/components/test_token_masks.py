"""Token masks: OPSM, DPPO's divergence mask, forking tokens, Clip-Cov, KL-Cov; hand-worked and composed."""

import math

import pytest
import torch

from gspo_lightning import (
    ClipCov,
    DivergenceMask,
    HighEntropyTokens,
    KLCov,
    MaskInputs,
    NoClip,
    OffPolicySequenceMask,
    PolicyObjective,
    PPOClip,
    SAPOGate,
    TokenRatio,
)


def _inputs(lp, old, adv, mask=None, **extra):
    lp, old = torch.as_tensor(lp, dtype=torch.float64), torch.as_tensor(old, dtype=torch.float64)
    mask = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask
    adv = torch.as_tensor(adv, dtype=torch.float64)
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    return MaskInputs(lp, old, adv.masked_fill(~mask, 0.0), mask, **extra)


def test_opsm_drops_only_negative_far_sequences():
    # behaviour (engine) log-probs -1 everywhere; current (-1.2, -1.0): per-token mean divergence (0.2 + 0) / 2 = 0.1
    # rows: A = -1 and divergence 0.1 > 0.05 -> dropped; A = +1 same divergence -> kept; A = -1, divergence 0.01 -> kept
    lp = [[-1.2, -1.0], [-1.2, -1.0], [-1.02, -1.0]]
    old = [[-1.1, -1.1]] * 3  # pi_old differs: the engine's log-probs are the behaviour policy when reported
    rollout = torch.full((3, 2), -1.0, dtype=torch.float64)
    out = OffPolicySequenceMask(delta=0.05)(_inputs(lp, old, [-1.0, 1.0, -1.0], rollout_logprobs=rollout))
    assert out.weights.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    torch.testing.assert_close(out.metrics["policy/opsm_masked_frac"], torch.tensor(2 / 6))


def test_opsm_falls_back_to_pi_old_without_engine_logprobs():
    # no engine log-probs: divergence against pi_old, (-1.0 - -1.3) = 0.3 > 0.1 for the negative row
    out = OffPolicySequenceMask(delta=0.1)(_inputs([[-1.3], [-1.3]], [[-1.0], [-1.0]], [-1.0, 1.0]))
    assert out.weights.tolist() == [[0.0], [1.0]]


def test_dppo_tv_masks_moves_in_the_advantages_direction_only():
    # q = 0.5; p = 0.7 (rises by 0.2 > 0.15), p = 0.3 (falls by 0.2), p = 0.6 (rises by 0.1)
    old = [[math.log(0.5)] * 3] * 2
    lp = [[math.log(0.7), math.log(0.3), math.log(0.6)]] * 2
    out = DivergenceMask("tv", 0.15, 0.15)(_inputs(lp, old, [1.0, -1.0]))
    # A > 0: the rise past 0.15 is dropped; the fall (against the push) and the small rise are kept
    # A < 0: the fall past 0.15 is dropped; the rise moves against the push, kept
    assert out.weights.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]


def test_dppo_binary_kl_value():
    # q = 0.5, p = 0.7: 0.5 log(0.5/0.7) + 0.5 log(0.5/0.3) = 0.0871767
    mask = DivergenceMask("kl", 0.05, 0.05)
    d = mask.binary_divergence(torch.tensor([[math.log(0.7)]]), torch.tensor([[math.log(0.5)]]))
    torch.testing.assert_close(
        d, torch.tensor([[0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)]], dtype=torch.float64)
    )
    out = mask(_inputs([[math.log(0.7)], [math.log(0.52)]], [[math.log(0.5)], [math.log(0.5)]], [1.0, 1.0]))
    assert out.weights.tolist() == [[0.0], [1.0]]
    # p = 1 with q < 1 is an infinite divergence in exact arithmetic: finite and masked here
    assert torch.isfinite(mask.binary_divergence(torch.zeros(1, 1), torch.tensor([[math.log(0.5)]]))).all()


def test_dppo_kl_penalty_is_prime_rls_squared_log_ratio_on_every_token():
    lp = torch.tensor([[math.log(0.7), math.log(0.6)]], dtype=torch.float64, requires_grad=True)
    old = torch.full((1, 2), math.log(0.5), dtype=torch.float64)
    out = DivergenceMask("tv", 0.15, 0.15, kl_coef=1e-3)(MaskInputs(lp, old, torch.ones(1, 2), torch.ones(1, 2).bool()))
    torch.testing.assert_close(out.penalty, 1e-3 * (lp - old).square())
    assert out.weights.tolist() == [[0.0, 1.0]]  # the first token is masked but still penalised
    (grad,) = torch.autograd.grad(out.penalty.sum(), lp)
    torch.testing.assert_close(grad, 2e-3 * (lp - old).detach())


def test_forking_tokens_keep_the_top_entropy_share():
    # entropies 1..8, top 25%: threshold = quantile(0.75) = 1 + 0.75 * 7 = 6.25 -> tokens with H = 7, 8 kept
    entropy = torch.arange(1.0, 9.0, dtype=torch.float64).view(2, 4)
    zeros = torch.zeros(2, 4)
    out = HighEntropyTokens(0.25)(_inputs(zeros, zeros, [1.0, 1.0], entropy=entropy))
    assert out.weights.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]
    torch.testing.assert_close(out.metrics["policy/forking_entropy_threshold"], torch.tensor(6.25))


def test_the_quantile_is_torch_s_for_any_size():
    from gspo_lightning.components.token_selection import linear_quantile

    values = torch.rand(1001, generator=torch.Generator().manual_seed(2))
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        torch.testing.assert_close(linear_quantile(values, q), torch.quantile(values, q))
    assert torch.isfinite(linear_quantile(torch.rand(17_000_000), 0.8))  # torch.quantile refuses over 16M


def test_forking_tokens_ignore_padding():
    entropy = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = HighEntropyTokens(0.5)(_inputs(torch.zeros(2, 3), torch.zeros(2, 3), [1.0, 1.0], mask, entropy=entropy))
    # the real entropies are 1..4: the median 2.5 -> 3 and 4 kept; padding stays 0
    assert out.weights.tolist() == [[0, 0, 0], [1, 1, 0]]


# A = (2, 2, -2, -2) (mean 0), lp = (-1, -3, -1, -3) (mean -2): Cov = (2, -2, -2, 2); band (1, 5) = tokens 0 and 3
COV_LP, COV_ADV = [[-1.0, -3.0, -1.0, -3.0]], [[2.0, 2.0, -2.0, -2.0]]


def test_clip_cov_detaches_a_random_share_of_the_band():
    ids = torch.tensor([[5, 6, 7, 8]])
    one = ClipCov(ratio=0.25, low=1.0, high=5.0)(_inputs(COV_LP, COV_LP, COV_ADV, response_ids=ids))
    dropped = (one.weights == 0).nonzero()[:, 1].tolist()
    assert len(dropped) == 1 and dropped[0] in (0, 3), "floor(0.25 * 4) = 1 token, drawn from the band"
    again = ClipCov(ratio=0.25, low=1.0, high=5.0)(_inputs(COV_LP, COV_LP, COV_ADV, response_ids=ids))
    assert torch.equal(one.weights, again.weights), "the same batch draws the same tokens"
    both = ClipCov(ratio=0.5, low=1.0, high=5.0)(_inputs(COV_LP, COV_LP, COV_ADV, response_ids=ids))
    assert both.weights.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    none = ClipCov(ratio=0.5, low=2.5, high=5.0)(_inputs(COV_LP, COV_LP, COV_ADV, response_ids=ids))
    assert none.weights.tolist() == [[1.0] * 4], "no token in the band: nothing is detached"


def test_kl_cov_penalises_the_top_covariance_tokens():
    # A = (3, 1, -1, -3), lp = (-1, -2, -4, -3): centred (1.5, 0.5, -1.5, -0.5) -> Cov = (4.5, 0.5, 1.5, 1.5)
    out = KLCov(ratio=0.25, coef=2.0)(_inputs([[-1.0, -2.0, -4.0, -3.0]], [[0.0] * 4], [[3.0, 1.0, -1.0, -3.0]]))
    assert out.kl_coef.tolist() == [[2.0, 0.0, 0.0, 0.0]] and out.weights.tolist() == [[1.0] * 4]


def test_kl_cov_penalty_in_the_objective():
    # one token with c = 2 and lp - old = 0.3: its loss gains 2 * 0.3 and its gradient 2 * sign(0.3) = 2
    lp = torch.tensor([[-0.7, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    coef = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = torch.zeros(1, dtype=torch.float64)
    out = PolicyObjective(TokenRatio(), NoClip(), aggregation="token-mean")(lp, old, adv, mask, token_kl_coef=coef)
    torch.testing.assert_close(out.loss, torch.tensor(0.6 / 2, dtype=torch.float64))
    (grad,) = torch.autograd.grad(out.loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_masks_compose_with_any_objective_and_keep_denominators():
    # OPSM drops row 0 (A < 0, far): the token mean still divides by all 4 tokens, as TRL and verl do
    lp = torch.tensor([[-1.5, -1.5], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.full((2, 2), -1.0, dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    for clip in (PPOClip(0.2, 0.2), SAPOGate()):
        plain = PolicyObjective(TokenRatio(), clip, aggregation="token-mean")
        masked = PolicyObjective(TokenRatio(), clip, aggregation="token-mean", masks=[OffPolicySequenceMask(0.1)])
        kept = clip(plain.ratio(lp, old, mask), adv).loss[1].sum() / 4
        torch.testing.assert_close(masked(lp, old, adv, mask).loss, kept)
        (grad,) = torch.autograd.grad(masked(lp, old, adv, mask).loss, lp)
        assert (grad[0] == 0).all() and (grad[1] != 0).all()


def test_pre_update_masks_are_refused_inside_the_objective():
    with pytest.raises(ValueError, match="pre_update"):
        PolicyObjective(TokenRatio(), PPOClip(), masks=[HighEntropyTokens()])


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="delta >= 0"):
        OffPolicySequenceMask(delta=-1.0)
    with pytest.raises(ValueError, match="'tv' or 'kl'"):
        DivergenceMask("js")
    with pytest.raises(ValueError, match="top_fraction"):
        HighEntropyTokens(0.0)
    with pytest.raises(ValueError, match="low < high"):
        ClipCov(low=5.0, high=1.0)
    with pytest.raises(ValueError, match="coef > 0"):
        KLCov(coef=0.0)


def test_dppo_objective_gradient_equals_its_definition():
    # DPPO (arXiv 2602.04879): L = -(1/n) sum_t M_t r_t A_t (token mean) + c (lp - old)^2 on every token, M from the
    # binary TV against pi_old; written out with the mask computed by hand
    g = torch.Generator().manual_seed(5)
    old = torch.log(torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.8 + 0.1)
    lp = (old + 0.5 * torch.randn(3, 4, generator=g, dtype=torch.float64)).clamp(max=-1e-3).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.bool)
    objective = PolicyObjective(
        TokenRatio(), NoClip(), aggregation="token-mean", masks=[DivergenceMask("tv", 0.1, 0.1, kl_coef=0.01)]
    )
    ours = objective(lp, old, adv, mask).loss
    p, q, a = lp.detach().exp(), old.exp(), adv[:, None].expand(3, 4)
    keep = ~(((a > 0) & (p - q > 0.1)) | ((a <= 0) & (q - p > 0.1)))
    assert 0 < int((~keep).sum()) < 12, "the case must mask some tokens, not all"
    ref = (-(keep * torch.exp(lp - old) * a) + 0.01 * (lp - old).square()).mean()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, lp)[0], torch.autograd.grad(ref, lp)[0])


def test_update_masks_compose_with_the_mismatch_correction():
    # the correction's weights (here 0.5 on every token) and OPSM's 0/1 multiply
    lp = torch.tensor([[-1.5, -1.5], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.full((2, 2), -1.0, dtype=torch.float64)
    adv, mask = torch.tensor([-1.0, 1.0], dtype=torch.float64), torch.ones(2, 2, dtype=torch.bool)
    is_weights = torch.full((2, 2), 0.5, dtype=torch.float64)
    objective = PolicyObjective(TokenRatio(), NoClip(), aggregation="token-mean", masks=[OffPolicySequenceMask(0.1)])
    out = objective(lp, old, adv, mask, token_weights=is_weights)
    # row 0 dropped; row 1: r = 1, A = 1 -> -1 per token, x 0.5, over 4 tokens
    torch.testing.assert_close(out.loss, torch.tensor(-0.5 * 2 / 4, dtype=torch.float64))
    torch.testing.assert_close(out.metrics["policy/masked_frac"], torch.tensor(0.5))
