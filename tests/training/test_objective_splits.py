"""The 2025-26 objectives and token masks: micro-batches, token budgets and padding-free packing give the
whole-batch gradient, with the masks acting (pre-update masks are selected once, on the whole rollout batch)."""

import pytest
import torch
from support import accumulated_grads, built_module, prepared

from gspo_lightning import (
    CISPOClip,
    ClipCov,
    DivergenceMask,
    GMPOClip,
    HighEntropyTokens,
    KLCov,
    LossCounts,
    NoClip,
    OffPolicySequenceMask,
    PPOClip,
    SAPOGate,
    SequenceRatio,
    TokenRatio,
)

OBJECTIVES = {
    "sapo": dict(ratio=TokenRatio(), clip=SAPOGate()),
    "sapo-sequence": dict(ratio=SequenceRatio(), clip=SAPOGate()),
    "cispo": dict(ratio=TokenRatio(), clip=CISPOClip(eps_high=0.1), aggregation="token-mean"),
    "gmpo": dict(ratio=TokenRatio(), clip=GMPOClip(0.1, 0.1)),
    "dppo": dict(ratio=TokenRatio(), clip=NoClip(), token_masks=[DivergenceMask("tv", 0.005, 0.005, kl_coef=1e-3)]),
    "gspo-opsm": dict(token_masks=[OffPolicySequenceMask(delta=0.0)]),
    "forking": dict(ratio=TokenRatio(), clip=PPOClip(0.2, 0.2), token_masks=[HighEntropyTokens(0.2)]),
    "clip-cov": dict(ratio=TokenRatio(), clip=PPOClip(0.2, 0.2), token_masks=[ClipCov(0.2, low=0.0, high=1e3)]),
    "kl-cov": dict(ratio=TokenRatio(), clip=NoClip(), token_masks=[KLCov(0.2, coef=1.0)]),
}


def _off_policy(module, rollout):
    """The prepared batch with pi_old moved away from the policy (so ratios, gates and masks act), engine
    log-probs beside it (OPSM's behaviour policy), and advantages of both signs."""
    rollout.rewards = torch.rand(len(rollout), generator=torch.Generator().manual_seed(1))  # non-zero advantages
    batch = prepared(module, rollout)
    g = torch.Generator().manual_seed(0)
    noise = 0.3 * torch.randn(batch.response_mask.shape, generator=g)
    batch.old_logprobs = (batch.old_logprobs + noise).clamp(max=0.0).masked_fill(~batch.response_mask, 0.0)
    batch.rollout_logprobs = batch.old_logprobs - 0.05 * noise.abs()
    batch.advantages = torch.linspace(-1, 1, len(batch))
    return batch


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_split_gives_the_whole_batch_gradient(tiny_path, rollout, name):
    options = dict(mini_batches=2, old_logprobs="recompute", **OBJECTIVES[name])
    whole = built_module(tiny_path, **options)
    batch = _off_policy(whole, rollout)
    _, metrics = whole.policy_loss(whole.policy, batch, LossCounts.from_mask(batch.response_mask))
    if "token_masks" in OBJECTIVES[name]:
        acts = metrics.get("policy/masked_frac", 0) > 0 or metrics.get("policy/token_kl_penalty", 0) > 0
        assert acts, f"{name}: the mask never acted, the test would not see a split error ({metrics})"
    g_whole = accumulated_grads(whole, batch)
    assert g_whole.abs().sum() > 0
    for split in (dict(micro_batch_size=3), dict(micro_batch_tokens=40, padding_free=True)):
        part = built_module(tiny_path, **options, **split)
        part.policy.load_state_dict(whole.policy.state_dict())
        torch.testing.assert_close(accumulated_grads(part, batch), g_whole, rtol=1e-4, atol=1e-6, msg=f"{name} {split}")


def test_pre_update_masks_select_on_the_whole_rollout_batch(tiny_path, rollout):
    # forking tokens: the kept share is over the rollout batch's real tokens, so ~20% of them whatever the split
    module = built_module(tiny_path, mini_batches=2, token_masks=[HighEntropyTokens(0.2)])
    batch = prepared(module, rollout)
    kept = batch.is_weights[batch.response_mask]
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    assert abs(kept.mean().item() - 0.2) < 0.05
    assert module.pre_update.source == "trainer", "a pre-update mask needs pi_old's pass even on-policy"


def test_entropy_masks_refuse_engine_pi_old(tiny_path):
    with pytest.raises(ValueError, match="entropies"):
        built_module(tiny_path, old_logprobs="rollout", token_masks=[HighEntropyTokens()])
