"""GSPOModule outside the Trainer: what it computes per rollout batch."""

import pytest
import torch

from gspo_lightning import K1KL, ContrastAdvantage, LossCounts, TokenRatio
from gspo_lightning.module import GSPOModule


def _module(tiny_path, **kwargs):
    module = GSPOModule(model=tiny_path, **kwargs)
    module.configure_model()
    return module


def test_on_policy_skips_the_old_logprob_pass(tiny_path, rollout):
    module = _module(tiny_path, mini_batches=1, epochs=1)
    batch = module.prepare_batch(rollout)
    assert batch.old_logprobs is None and batch.ref_logprobs is None and module.reference is None
    assert batch.advantages.shape == (16,)


def test_off_policy_computes_old_logprobs_once(tiny_path, rollout):
    module = _module(tiny_path, mini_batches=2)
    batch = module.prepare_batch(rollout)
    assert batch.old_logprobs.shape == batch.response_mask.shape
    assert torch.isfinite(batch.old_logprobs[batch.response_mask]).all()
    assert (batch.old_logprobs[batch.response_mask] <= 0).all()


def test_reference_only_when_needed(tiny_path, rollout):
    assert _module(tiny_path, kl_coef=0.0).reference is None
    with_kl = _module(tiny_path, kl_coef=0.1, ratio=TokenRatio())
    assert with_kl.reference is not None and not any(p.requires_grad for p in with_kl.reference.parameters())
    assert "reference" not in "".join(with_kl.state_dict())  # not saved in checkpoints
    assert _module(tiny_path, advantage=ContrastAdvantage()).reference is not None


def test_kl_in_reward_lowers_rewards_and_keeps_loss_kl_free(tiny_path, rollout):
    module = _module(tiny_path, kl_coef=0.5, kl=K1KL(), kl_in_reward=True)
    # perturb the policy so pi_old != pi_ref
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rewards = rollout.rewards.clone()
    batch = module.prepare_batch(rollout)
    assert not torch.allclose(batch.rewards, rewards)
    assert module.objective.kl_coef == 0.0 and "rollout/kl_penalty_mean" in batch.metrics


def _grads(module, batch, counts=None):
    module.policy.zero_grad()
    index = torch.arange(len(batch))
    micro = module._micro_batches(index)
    from gspo_lightning.components.aggregation import LossCounts

    counts = LossCounts.from_mask(batch.response_mask)
    for part in micro:
        piece = batch.select(part)
        with module._routing_context(piece):
            loss, _ = module._micro_step(piece, counts)
            loss.backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_path, rollout, aggregation):
    whole = _module(tiny_path, mini_batches=2, aggregation=aggregation, max_new_tokens=8, entropy_coef=0.01)
    batch = whole.prepare_batch(rollout)
    # make the advantages non-trivial even if all rewards happened to be equal
    batch.advantages = torch.linspace(-1, 1, len(batch))
    g_whole = _grads(whole, batch)
    micro = _module(
        tiny_path,
        mini_batches=2,
        aggregation=aggregation,
        max_new_tokens=8,
        entropy_coef=0.01,
        micro_batch_size=3,
    )
    micro.policy.load_state_dict(whole.policy.state_dict())
    g_micro = _grads(micro, batch)
    torch.testing.assert_close(g_micro, g_whole, rtol=1e-4, atol=1e-6)
    assert g_whole.abs().sum() > 0


def test_bad_module_options(tiny_path):
    with pytest.raises(ValueError, match="mini_batches"):
        GSPOModule(model=tiny_path, mini_batches=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GSPOModule(model=tiny_path, micro_batch_size=0)


def _with_engine_logprobs(module, batch, shift: float):
    """Give the batch engine log-probs that differ from the trainer's by ``shift`` per token."""
    trainer_lp = module._no_grad_logprobs(batch, module.policy)
    batch.rollout_logprobs = trainer_lp - shift
    return trainer_lp


def test_rollout_logprobs_can_stand_in_for_pi_old(tiny_path, rollout):
    module = _module(tiny_path, mini_batches=2, old_logprobs="rollout")
    engine_lp = _with_engine_logprobs(module, rollout, 0.1)
    batch = module.prepare_batch(rollout)
    torch.testing.assert_close(batch.old_logprobs, engine_lp - 0.1)
    with pytest.raises(ValueError, match="reports log-probs"):
        rollout.rollout_logprobs = None
        module.prepare_batch(rollout)


def test_mismatch_is_logged_and_corrected(tiny_path, rollout):
    from gspo_lightning.components.mismatch import MismatchCorrection

    plain = _module(tiny_path, mini_batches=2)
    _with_engine_logprobs(plain, rollout, 0.5)
    batch = plain.prepare_batch(rollout)
    assert batch.metrics["sampling/logprob_diff_mean"] == pytest.approx(0.5, abs=1e-4)
    assert batch.is_weights is None
    corrected = _module(tiny_path, mini_batches=2, mismatch_correction=MismatchCorrection("token", "truncate", 1.2))
    batch = corrected.prepare_batch(rollout)
    # weight exp(old - rollout) = exp(0.5) = 1.65, truncated at 1.2 on every real token
    torch.testing.assert_close(
        batch.is_weights[batch.response_mask], torch.full_like(batch.is_weights[batch.response_mask], 1.2)
    )
    assert "sampling/is_weight_mean" in batch.metrics
    batch.advantages = torch.linspace(-1, 1, len(batch))
    counts = LossCounts.from_mask(batch.response_mask)
    weighted, _ = corrected._micro_step(batch, counts)
    batch.is_weights = None
    unweighted, _ = corrected._micro_step(batch, counts)
    torch.testing.assert_close(weighted, 1.2 * unweighted)
