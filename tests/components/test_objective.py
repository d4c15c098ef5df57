"""PolicyObjective: the composition, its metrics, and the properties of docs/algorithms.md#how-the-pieces-meet."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo_lightning import (
    K3KL,
    AggregationMode,
    LossCounts,
    NoClip,
    PolicyObjective,
    PPOClip,
    SequenceRatio,
    SequenceTokenRatio,
    TokenRatio,
)


def _inputs(n=4, t=6, seed=0, lengths=None):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g) * 3
    lp = old + 0.05 * torch.randn(n, t, generator=g)
    lengths = torch.tensor(lengths) if lengths is not None else torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return lp, old, mask


def _loss_and_grad(objective, lp, old, adv, mask, ref=None):
    lp = lp.clone().requires_grad_(True)
    out = objective(lp, old, adv, mask, ref_logprobs=ref)
    out.loss.backward()
    return out, lp.grad


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_gspo_token_equals_gspo_value_and_gradient_with_sequence_advantage(agg: AggregationMode):
    lp, old, mask = _inputs(seed=1)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5])
    clip = PPOClip(3e-4, 4e-4)
    a, ga = _loss_and_grad(PolicyObjective(SequenceRatio(), clip, aggregation=agg), lp, old, adv, mask)
    b, gb = _loss_and_grad(PolicyObjective(SequenceTokenRatio(), clip, aggregation=agg), lp, old, adv, mask)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)


def test_gspo_token_differs_with_per_token_advantages():
    lp, old, mask = _inputs(seed=2, lengths=[6, 6, 6, 6])
    adv = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    _, ga = _loss_and_grad(PolicyObjective(SequenceRatio(), NoClip()), lp, old, adv.mean(-1), mask)
    _, gb = _loss_and_grad(PolicyObjective(SequenceTokenRatio(), NoClip()), lp, old, adv, mask)
    assert not torch.allclose(ga, gb)


def test_on_policy_ratio_is_one_and_nothing_clips():
    lp, _, mask = _inputs(seed=3)
    out = PolicyObjective(SequenceRatio(), PPOClip(3e-4, 4e-4))(lp, lp.detach(), torch.ones(4), mask)
    assert out.metrics["policy/ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["policy/clip_frac_token"].item() == 0.0


def test_metrics_names_and_values():
    # one sequence with sequence ratio 1.5 (clipped high for A>0), one with ratio 1: half the sequences clip
    lp = torch.log(torch.tensor([[1.5, 1.5], [1.0, 1.0]]))
    out = PolicyObjective(SequenceRatio(), PPOClip(0.2, 0.2))(
        lp, torch.zeros(2, 2), torch.ones(2), torch.ones(2, 2, dtype=torch.bool)
    )
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["policy/ratio_max"] == pytest.approx(1.5) and m["policy/ratio_min"] == pytest.approx(1.0)
    assert m["policy/clip_frac_seq"] == pytest.approx(0.5) and m["policy/clip_frac_token"] == pytest.approx(0.5)
    assert m["policy/clip_frac_high"] == pytest.approx(0.5) and m["policy/clip_frac_low"] == 0.0
    assert "policy/kl" not in m
    assert all(not v.requires_grad for v in out.metrics.values())


def test_kl_term_is_added_with_its_coefficient():
    lp, old, mask = _inputs(seed=4)
    ref = old - 0.1
    base = PolicyObjective(TokenRatio(), PPOClip())(lp, old, torch.ones(4), mask)
    with_kl = PolicyObjective(TokenRatio(), PPOClip(), kl=K3KL(), kl_coef=0.5)(
        lp, old, torch.ones(4), mask, ref_logprobs=ref
    )
    kl = K3KL()(lp.masked_fill(~mask, 0), ref.masked_fill(~mask, 0))
    expected_kl = (kl * mask).sum() / mask.sum()
    torch.testing.assert_close(with_kl.loss, base.loss + 0.5 * expected_kl)
    torch.testing.assert_close(with_kl.metrics["policy/kl"], expected_kl)


def test_kl_configuration_errors():
    with pytest.raises(ValueError, match="needs a KL estimator"):
        PolicyObjective(TokenRatio(), PPOClip(), kl_coef=0.1)
    objective = PolicyObjective(TokenRatio(), PPOClip(), kl=K3KL(), kl_coef=0.1)
    lp, old, mask = _inputs()
    with pytest.raises(ValueError, match="ref_logprobs"):
        objective(lp, old, torch.ones(4), mask)


@pytest.mark.parametrize("ratio", [TokenRatio(), SequenceRatio(), SequenceTokenRatio()])
def test_degenerate_inputs_give_finite_loss_and_gradients(ratio):
    # a zero-length response, log ratios of +-100 on real tokens, and -inf log-probs at padding
    lp = torch.tensor([[0.0, 0.0, 0.0], [-100.0, float("-inf"), float("-inf")], [100.0, -1.0, float("-inf")]])
    old = torch.tensor([[float("-inf")] * 3, [0.0, float("-inf"), float("-inf")], [-0.0, -100.0, float("-inf")]])
    mask = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        objective = PolicyObjective(ratio, PPOClip(), kl=K3KL(), kl_coef=0.1, aggregation=agg)
        out, grad = _loss_and_grad(objective, lp, old, torch.tensor([1.0, -1.0, 2.0]), mask, ref=old)
        assert torch.isfinite(out.loss), agg
        assert torch.isfinite(grad).all(), agg
        assert all(torch.isfinite(v) for v in out.metrics.values()), agg


@settings(max_examples=30, deadline=None)
@given(
    extra=st.integers(1, 5),
    fill=st.sampled_from([0.0, -1e9, float("-inf"), float("nan")]),
    seed=st.integers(0, 999),
)
def test_padding_never_changes_the_result(extra, fill, seed):
    lp, old, mask = _inputs(seed=seed)
    adv = torch.randn(4, generator=torch.Generator().manual_seed(seed))
    objective = PolicyObjective(SequenceRatio(), PPOClip(0.2, 0.2), aggregation="seq-mean-token-mean")
    a, ga = _loss_and_grad(objective, lp, old, adv, mask)
    pad = torch.full((4, extra), fill)
    lp2 = torch.cat([lp.masked_fill(~mask, fill), pad], 1)
    old2 = torch.cat([old.masked_fill(~mask, fill), pad], 1)
    mask2 = torch.cat([mask, torch.zeros(4, extra, dtype=torch.bool)], 1)
    b, gb = _loss_and_grad(objective, lp2, old2, adv, mask2)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga.masked_fill(~mask, 0), gb[:, : lp.shape[1]].masked_fill(~mask, 0))
    assert (gb[:, lp.shape[1] :] == 0).all()


def test_micro_batches_reproduce_whole_batch_gradient():
    lp, old, mask = _inputs(n=8, seed=5)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(1))
    objective = PolicyObjective(SequenceRatio(), PPOClip(0.2, 0.2), aggregation="seq-mean-token-mean")
    _, whole = _loss_and_grad(objective, lp, old, adv, mask)
    counts = LossCounts.from_mask(mask)
    leaf = lp.clone().requires_grad_(True)
    for idx in (torch.arange(0, 3), torch.arange(3, 8)):
        objective(leaf[idx], old[idx], adv[idx], mask[idx], counts=counts).loss.backward()
    torch.testing.assert_close(leaf.grad, whole)
