"""Clips: PPO, clip-higher, dual-clip, none; with hand-worked values."""

import pytest
import torch

from gspo_lightning import LOG_RATIO_BOUND, DualClip, NoClip, PPOClip


def _log(*ratios):
    return torch.log(torch.tensor([list(ratios)]))


def test_ppo_symmetric_positive_advantage():
    # A = 2: r = 0.5 -> min(1.0, 0.8*2=1.6) = 1.0 -> loss -1.0 (not clipped: r below the range with A>0)
    #        r = 1.1 -> min(2.2, 2.2) -> -2.2;  r = 1.5 -> min(3.0, 1.2*2=2.4) -> -2.4 (clipped high)
    out = PPOClip(0.2, 0.2)(_log(0.5, 1.1, 1.5), torch.tensor([2.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.0, -2.2, -2.4]]))
    assert out.clipped_high.tolist() == [[False, False, True]]
    assert not out.clipped_low.any()


def test_ppo_negative_advantage_clips_low():
    # A = -1: r = 0.5 -> min(-0.5, 0.8*-1=-0.8) = -0.8 -> loss 0.8 (clipped low)
    #         r = 1.5 -> min(-1.5, -1.2) = -1.5 -> loss 1.5 (not clipped: the pessimistic bound keeps r)
    out = PPOClip(0.2, 0.2)(_log(0.5, 1.5), torch.tensor([-1.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[0.8, 1.5]]))
    assert out.clipped_low.tolist() == [[True, False]]
    assert not out.clipped_high.any()


def test_clip_higher_is_asymmetric():
    # DAPO 0.2/0.28, A = 1: r = 1.25 is inside (1 + 0.28) -> -1.25; r = 0.75 < 0.8 with A > 0 -> -0.75
    out = PPOClip(0.2, 0.28)(_log(1.25, 1.3, 0.75), torch.tensor([1.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.25, -1.28, -0.75]]))
    assert out.clipped_high.tolist() == [[False, True, False]]


def test_gspo_tiny_range():
    # GSPO 3e-4 / 4e-4 on a sequence ratio of 1.001: clipped at 1.0004 for A > 0
    out = PPOClip(3e-4, 4e-4)(_log(1.001), torch.tensor([1.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.0004]]))
    assert out.clipped_high.all()


def test_dual_clip_caps_negative_advantage():
    # A = -1, c = 3: r = 5 -> PPO loss max(5, 1.2) = 5, capped at -c*A = 3; r = 2 -> 2 (below the cap)
    out = DualClip(0.2, 0.2, c=3.0)(_log(5.0, 2.0), torch.tensor([-1.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[3.0, 2.0]]))
    assert out.clipped_high.tolist() == [[True, False]]
    # positive advantages are plain PPO
    pos = DualClip(0.2, 0.2, c=3.0)(_log(5.0), torch.tensor([1.0]))
    torch.testing.assert_close(pos.loss, torch.tensor([[-1.2]]))


def test_no_clip():
    out = NoClip()(_log(5.0, 0.1), torch.tensor([2.0]))
    torch.testing.assert_close(out.loss, torch.tensor([[-10.0, -0.2]]))
    assert not out.clipped.any()


def test_per_token_advantages():
    out = PPOClip()(_log(1.0, 1.0), torch.tensor([[1.0, -3.0]]))
    torch.testing.assert_close(out.loss, torch.tensor([[-1.0, 3.0]]))


@pytest.mark.parametrize("clip", [PPOClip(), DualClip(), NoClip()])
def test_extreme_log_ratios_are_bounded(clip):
    log_ratio = torch.tensor([[100.0, -100.0]], requires_grad=True)
    out = clip(log_ratio, torch.tensor([1.0]))
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(log_ratio.grad).all()
    assert out.ratio.max() <= torch.exp(torch.tensor(LOG_RATIO_BOUND))


def test_invalid_ranges():
    with pytest.raises(ValueError, match="eps_low"):
        PPOClip(eps_low=1.5)
    with pytest.raises(ValueError, match="c > 1"):
        DualClip(c=0.5)
