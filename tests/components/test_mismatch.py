"""Rollout/trainer mismatch correction against hand-worked weights (runs without vLLM)."""

import math

import pytest
import torch

from gspo_lightning.components.mismatch import LOG_WEIGHT_BOUND, MismatchCorrection

# Trainer (old) and engine (rollout) log-probs of 2 responses: 3 tokens, and 2 tokens + 1 pad.
# old - rollout per token: row 0 (0.5, 0.0, -2.0), row 1 (0.0, 1.0, pad)
OLD = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
ROLLOUT = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.5, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
E = math.e


def weights(level, mode, **kwargs):
    return MismatchCorrection(level=level, mode=mode, **kwargs)(OLD, ROLLOUT, MASK)


def test_token_truncate():
    # exp(0.5)=1.6487, exp(0)=1, exp(-2)=0.1353; row 1: 1, exp(1)=2.718 -> capped at C=2
    out = weights("token", "truncate")
    expected = torch.tensor([[math.exp(0.5), 1.0, math.exp(-2.0)], [1.0, 2.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(out.metrics["sampling/is_clipped_frac"], torch.tensor(1 / 5))
    assert torch.equal(out.weights > 0, MASK)  # truncation rejects nothing


def test_token_mask_is_two_sided_with_reciprocal_lower_bound():
    # bounds [1/2, 2]: 0.1353 < 0.5 and 2.718 > 2 are masked (weight 0), the other 3 tokens keep exp(diff)
    out = weights("token", "mask")
    expected = torch.tensor([[math.exp(0.5), 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    assert (out.weights > 0).tolist() == [[True, True, False], [True, False, False]]
    torch.testing.assert_close(out.metrics["sampling/is_masked_frac"], torch.tensor(2 / 5))


def test_token_mask_one_sided_like_trl():
    # threshold_lower=0: only weights above C are masked, 0.1353 stays
    out = weights("token", "mask", threshold_lower=0.0)
    torch.testing.assert_close(out.weights[0, 2], torch.tensor(math.exp(-2.0)))
    assert out.weights[1, 1] == 0


def test_sequence_truncate():
    # row 0: exp(0.5 + 0 - 2) = exp(-1.5) = 0.2231 on every token; row 1: exp(0 + 1) = 2.718 -> 2
    out = weights("sequence", "truncate")
    expected = torch.tensor([[math.exp(-1.5)] * 3, [2.0, 2.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    torch.testing.assert_close(out.metrics["sampling/is_clipped_frac"], torch.tensor(2 / 5))


def test_sequence_mask_drops_whole_sequences():
    # row 0: 0.2231 < 1/4; row 1: 2.718 in [1/4, 4] -> kept whole
    out = weights("sequence", "mask", threshold=4.0)
    expected = torch.tensor([[0.0, 0.0, 0.0], [E, E, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    assert (out.weights > 0).tolist() == [[False, False, False], [True, True, False]]


def test_geometric_is_the_length_normalised_sequence_weight():
    # row 0: exp(-1.5 / 3) = exp(-0.5) = 0.6065; row 1: exp(1 / 2) = 1.6487
    out = weights("geometric", "truncate")
    expected = torch.tensor([[math.exp(-0.5)] * 3, [math.exp(0.5)] * 2 + [0.0]])
    torch.testing.assert_close(out.weights, expected)


def test_metrics():
    # |diff| over the 5 real tokens: 0.5, 0, 2, 0, 1 -> mean 0.7, max 2
    out = weights("token", "truncate")
    m = out.metrics
    torch.testing.assert_close(m["sampling/logprob_diff_mean"], torch.tensor(0.7))
    torch.testing.assert_close(m["sampling/logprob_diff_max"], torch.tensor(2.0))
    # weights 1.6487 + 1 + 0.1353 + 1 + 2 = 5.784 over 5 tokens
    torch.testing.assert_close(m["sampling/is_weight_mean"], torch.tensor((math.exp(0.5) + math.exp(-2) + 4) / 5))
    torch.testing.assert_close(m["sampling/is_weight_max"], torch.tensor(2.0))
    torch.testing.assert_close(m["sampling/is_weight_min"], torch.tensor(math.exp(-2.0)))
    assert all(v.ndim == 0 and not v.requires_grad for v in m.values())


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_padding_values_change_nothing(level, mode):
    corr = MismatchCorrection(level=level, mode=mode)
    base = corr(OLD, ROLLOUT, MASK)
    junk_old, junk_rollout = OLD.clone(), ROLLOUT.clone()
    junk_old[1, 2], junk_rollout[1, 2] = -float("inf"), float("nan")
    wider = corr(
        torch.cat([junk_old, torch.full((2, 2), 7.0)], 1),
        torch.cat([junk_rollout, torch.full((2, 2), -9.0)], 1),
        torch.cat([MASK, torch.zeros(2, 2, dtype=torch.bool)], 1),
    )
    torch.testing.assert_close(wider.weights[:, :3], base.weights)
    assert (wider.weights[:, 3:] == 0).all()
    for name, value in base.metrics.items():
        torch.testing.assert_close(wider.metrics[name], value)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_extreme_gaps_stay_finite(level, mode):
    old = torch.tensor([[0.0, -1e4, -float("inf")], [-80.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1e4, 0.0, -1.0], [0.0, -80.0, -float("inf")]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = MismatchCorrection(level=level, mode=mode, threshold=1e12)(old, rollout, mask)
    assert torch.isfinite(out.weights).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert out.weights.max() <= math.exp(LOG_WEIGHT_BOUND) * 1.0001


def test_identical_logprobs_give_weight_one():
    out = MismatchCorrection(level="sequence", mode="mask")(OLD, OLD, MASK)
    torch.testing.assert_close(out.weights, MASK.float())
    assert out.metrics["sampling/logprob_diff_max"] == 0


def test_empty_batch():
    empty = torch.zeros(2, 0)
    out = MismatchCorrection()(empty, empty, torch.zeros(2, 0, dtype=torch.bool))
    assert out.weights.shape == (2, 0)
    assert out.metrics["sampling/logprob_diff_max"] == 0 and out.metrics["sampling/is_weight_min"] == 1


def test_no_gradient_flows_through_the_weights():
    old = OLD.clone().requires_grad_(True)
    out = MismatchCorrection()(old, ROLLOUT, MASK)
    assert not out.weights.requires_grad
    loss = torch.ones(2, 3, requires_grad=True)
    (loss * out.weights).sum().backward()
    torch.testing.assert_close(loss.grad, out.weights)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": "batch"}, "level"),
        ({"mode": "clip"}, "mode"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 2.0, "threshold_lower": 3.0}, "threshold_lower"),
        # a cap below 1 without a lower bound: the message is about the cap the user set, not a bound never set
        ({"threshold": 0.5}, r"^threshold=0.5 is below 1: its default lower bound 1 / threshold = 2"),
        ({"rejection": "token", "rejection_threshold": 0.8}, r"^rejection_threshold=0.8 is below 1"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MismatchCorrection(**kwargs)


def test_geometric_rejection_alone_drops_whole_sequences():
    # per-token geometric means: row 0 exp(-1.5 / 3) = 0.607, row 1 exp(1 / 2) = 1.649; bounds [0.6, 1.6]
    out = weights("token", "none", rejection="geometric", rejection_threshold=1.6, rejection_threshold_lower=0.6)
    torch.testing.assert_close(out.weights, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.metrics["sampling/rs_rejected_frac"], torch.tensor(2 / 5))
    assert "sampling/is_clipped_frac" not in out.metrics and "sampling/is_masked_frac" not in out.metrics


def test_token_tis_with_a_geometric_rejection_mask():
    out = weights("token", "truncate", rejection="geometric", rejection_threshold=1.6, rejection_threshold_lower=0.6)
    expected = torch.tensor([[math.exp(0.5), 1.0, math.exp(-2.0)], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.weights, expected)
    # the reciprocal default lower bound 1 / 1.6 = 0.625 rejects row 0 (0.607) too
    both = weights("token", "truncate", rejection="geometric", rejection_threshold=1.6)
    assert both.weights.abs().sum() == 0


def test_icepop_bounds():
    # IcePop: token mask on [0.5, 5]: only exp(-2) = 0.135 leaves the band
    out = weights("token", "mask", threshold=5.0, threshold_lower=0.5)
    expected = torch.tensor([[math.exp(0.5), 1.0, 0.0], [1.0, math.e, 0.0]])
    torch.testing.assert_close(out.weights, expected)


def test_a_correction_that_corrects_nothing_is_refused():
    with pytest.raises(ValueError, match="mode='none' without a rejection level"):
        MismatchCorrection(mode="none")
    with pytest.raises(ValueError, match="rejection_threshold_lower must be in"):
        MismatchCorrection(rejection="token", rejection_threshold=1.5, rejection_threshold_lower=2.0)
