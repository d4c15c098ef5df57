"""Advantages: group-normalised, group-mean, RLOO, and the contrast advantage (docs/algorithms.md#advantages)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_batch

from gspo_lightning import (
    ClipOutput,
    ContrastAdvantage,
    GroupMeanAdvantage,
    GroupNormAdvantage,
    PPOClip,
    RLOOAdvantage,
)
from gspo_lightning.ops import group_stats


def test_group_norm_hand_worked():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(4*0.25/3) = 0.57735
    batch = make_batch([1, 0, 0, 1, 3, 3, 3, 3], group_size=4)
    adv = GroupNormAdvantage(eps=0.0)(batch)
    s = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]))
    assert not adv.requires_grad


def test_group_norm_batch_scale_and_none():
    batch = make_batch([1, 0, 2, 2], group_size=2)
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(GroupNormAdvantage(scale="none")(batch), centred)
    batch_std = torch.tensor([1.0, 0.0, 2.0, 2.0]).std()
    torch.testing.assert_close(GroupNormAdvantage(scale="batch", eps=0.0)(batch), centred / batch_std)
    torch.testing.assert_close(GroupMeanAdvantage()(batch), centred)


def test_rloo_is_leave_one_out():
    # R = (1, 2, 6): leave-one-out means 4, 3.5, 1.5 -> A = (-3, -1.5, 4.5) = 3/2 (R - 3)
    batch = make_batch([1, 2, 6], group_size=3)
    torch.testing.assert_close(RLOOAdvantage()(batch), torch.tensor([-3.0, -1.5, 4.5]))


@pytest.mark.parametrize("adv", [GroupNormAdvantage(), GroupMeanAdvantage(), RLOOAdvantage()])
def test_equal_rewards_and_singletons_give_zero(adv):
    batch = make_batch([0.7, 0.7, 0.7, 5.0], group_size=3)  # a group of 3 equal rewards and a group of one
    out = adv(batch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(4))


def test_group_ids_need_not_be_contiguous_or_sorted():
    batch = make_batch([1, 5, 0, 7], group_size=1)
    batch.group_ids = torch.tensor([42, 7, 42, 7])
    torch.testing.assert_close(GroupMeanAdvantage()(batch), torch.tensor([0.5, -1.0, -0.5, 1.0]))


def _contrast_batch(rewards, seq_ratios, lengths):
    # sequence i of length L_i with every token's log(old/ref) = log s_i, so the mean is log s_i
    t = max(lengths)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    log_s = torch.log(torch.tensor(seq_ratios))[:, None].expand(-1, t)
    return make_batch(
        rewards,
        group_size=len(rewards),
        response_mask=mask,
        old_logprobs=log_s.clone(),
        ref_logprobs=torch.zeros(len(rewards), t),
    )


def test_contrast_worked_example():
    # r = (8, 6, 4), mean 6 -> good {1, 2}, bad {3}; s = (1.051, 1.050, 0.950), L = (5, 7, 6)
    # s_good = (1.051 + 1.050)/2 = 1.0505; s_bad = 0.950; A = 0.1005 -> (+A, +A, -A)
    batch = _contrast_batch([8, 6, 4], [1.051, 1.050, 0.950], [5, 7, 6])
    adv = ContrastAdvantage()(batch)
    torch.testing.assert_close(adv, torch.tensor([0.1005, 0.1005, -0.1005]), atol=1e-5, rtol=0)
    # per-sequence losses -min(s A, clip(s) A) = (-0.1057, -0.1055, +0.0955); their mean is -0.0386
    # (a popular write-up prints 0.1022, the mean of the magnitudes with the signs dropped)
    log_s = torch.log(torch.tensor([[1.051], [1.050], [0.950]]))
    out: ClipOutput = PPOClip(0.2, 0.2)(log_s, adv)
    torch.testing.assert_close(out.loss[:, 0], torch.tensor([-0.1057, -0.1055, 0.0955]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss.mean(), torch.tensor(-0.0386), atol=1e-4, rtol=0)


def test_contrast_properties():
    # not zero-mean in a group: sum = (n_good - n_bad) A
    batch = _contrast_batch([8, 6, 4], [1.051, 1.050, 0.950], [5, 7, 6])
    adv = ContrastAdvantage()(batch)
    torch.testing.assert_close(adv.sum(), torch.tensor((2 - 1) * 0.1005), atol=1e-5, rtol=0)
    # the reward magnitudes do not matter beyond the split
    torch.testing.assert_close(
        ContrastAdvantage()(_contrast_batch([100, 99, -50], [1.051, 1.050, 0.950], [5, 7, 6])), adv
    )
    # pi_old == pi_ref (all s = 1) -> 0
    torch.testing.assert_close(
        ContrastAdvantage()(_contrast_batch([8, 6, 4], [1.0, 1.0, 1.0], [5, 7, 6])), torch.zeros(3)
    )
    # the sign follows the policy: if bad sequences have the larger ratio, good ones get a negative advantage
    flipped = ContrastAdvantage()(_contrast_batch([8, 6, 4], [0.9, 0.9, 1.1], [5, 7, 6]))
    assert flipped[0] < 0 and flipped[2] > 0
    # all rewards equal (no bad half): 0, where taking the empty mean as 0 would give every member mean s ~ 1
    equal = ContrastAdvantage()(_contrast_batch([0.1, 0.1, 0.1], [1.2, 1.1, 0.9], [5, 7, 6]))
    torch.testing.assert_close(equal, torch.zeros(3))
    assert ContrastAdvantage.needs_ref


def test_contrast_needs_reference_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        ContrastAdvantage()(make_batch([1, 0], group_size=2))


ALL_EQUAL = [(0.1, 8), (0.7, 16), (2.2, 16), (1.1, 3)]


@pytest.mark.parametrize(("value", "g"), ALL_EQUAL)
@pytest.mark.parametrize(
    "advantage",
    [
        GroupNormAdvantage(eps=0.0),
        GroupNormAdvantage(),
        GroupNormAdvantage(scale="batch"),
        GroupMeanAdvantage(),
        RLOOAdvantage(),
    ],
    ids=["norm-eps0", "norm", "norm-batch", "mean", "rloo"],
)
def test_all_equal_rewards_get_exactly_zero_advantage(advantage, value, g):
    # in float32, 8 x 0.1 sums to 1 ulp off 0.8: every member got the same non-zero advantage (0.0074, or ~1 with eps=0)
    rewards = torch.full((2 * g,), value, dtype=torch.float32).tolist()
    adv = advantage(make_batch(rewards, group_size=g))
    assert torch.equal(adv, torch.zeros_like(adv)), adv[:3]


@given(
    value=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32),
    g=st.integers(min_value=2, max_value=64),
)
@settings(max_examples=200, deadline=None)
def test_any_all_equal_group_has_zero_spread(value, g):
    rewards = torch.full((g,), value, dtype=torch.float32)
    mean, std, _ = group_stats(rewards, torch.zeros(g, dtype=torch.long))
    assert torch.equal(mean.float(), rewards) and torch.equal(std, torch.zeros_like(std))


def _batch_scale_on_rank(rank: int, init_file: str, rewards: list[float], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    half = len(rewards) // 2
    mine = rewards[rank * half : (rank + 1) * half]
    adv = GroupNormAdvantage(scale="batch", eps=0.0)(make_batch(mine, group_size=2))
    torch.save(adv, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_batch_scale_uses_the_std_of_every_rank(tmp_path):
    # rank 0's rewards spread little, rank 1's a lot: rank-local stds would scale the two halves differently
    rewards = [0.0, 0.1, 0.2, 0.3, 0.0, 4.0, 1.0, 9.0]
    whole = GroupNormAdvantage(scale="batch", eps=0.0)(make_batch(rewards, group_size=2))
    out = str(tmp_path / "adv")
    torch.multiprocessing.spawn(_batch_scale_on_rank, args=(str(tmp_path / "init"), rewards, out), nprocs=2)
    split = torch.cat([torch.load(f"{out}.0"), torch.load(f"{out}.1")])
    torch.testing.assert_close(split, whole)
