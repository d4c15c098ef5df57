"""The pre-update pass: pi_old from its named source, reference, KL in reward, mismatch weights, advantages."""

import math

import pytest
import torch
from support import built_module, prepared

from gspo_lightning import K1KL
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.training.pre_update import no_grad_logprobs, old_logprob_source


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize(
    ("mode", "on_policy", "needs_trainer_old", "source"),
    [
        ("auto", True, False, "none"),
        ("auto", False, False, "trainer"),
        ("auto", True, True, "trainer"),
        ("recompute", True, False, "trainer"),
        ("rollout", False, True, "rollout"),
    ],
)
def test_every_old_logprob_mode_resolves_to_a_named_source(mode, on_policy, needs_trainer_old, source):
    assert old_logprob_source(mode, on_policy, needs_trainer_old) == source


def test_on_policy_skips_the_old_logprob_pass(tiny_path, rollout):
    module = built_module(tiny_path, mini_batches=1, epochs=1)
    calls = _count_forwards(module.policy)
    batch = prepared(module, rollout)
    assert batch.old_logprobs is None and batch.ref_logprobs is None and module.reference is None
    assert batch.advantages.shape == (16,) and not calls


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_off_policy_computes_old_logprobs_once(tiny_path, rollout, micro_batch_size):
    module = built_module(tiny_path, mini_batches=2, micro_batch_size=micro_batch_size, track_routing_change=False)
    calls = _count_forwards(module.policy)
    batch = prepared(module, rollout)
    # one no-grad forward per micro-batch of the whole rollout batch, once, whatever the number of mini-batches
    assert len(calls) == math.ceil(16 / (micro_batch_size or 16))
    assert batch.old_logprobs.shape == batch.response_mask.shape
    assert torch.isfinite(batch.old_logprobs[batch.response_mask]).all()
    assert (batch.old_logprobs[batch.response_mask] <= 0).all()


def test_the_pass_returns_results_and_leaves_its_input_alone(tiny_path, rollout):
    module = built_module(tiny_path, mini_batches=2)
    result = module.pre_update(rollout, module.policy, module.reference, module.routing)
    assert rollout.old_logprobs is None and rollout.advantages is None and rollout.routing is None
    assert result.old_logprobs is not None and result.routing is not None and "time/old_logprob_s" in result.metrics


def test_kl_in_reward_keeps_raw_and_penalised_rewards_apart(tiny_path, rollout):
    module = built_module(tiny_path, kl_coef=0.5, kl=K1KL(), kl_in_reward=True)
    # perturb the policy so pi_old != pi_ref
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    raw = rollout.rewards.clone()
    batch = prepared(module, rollout)
    assert torch.equal(batch.rewards, raw), "the scored rewards stay as the rewards gave them"
    assert not torch.allclose(batch.penalised_rewards, raw)
    assert torch.equal(batch.advantage_rewards, batch.penalised_rewards)
    assert module.objective.kl_coef == 0.0 and "rollout/kl_penalty_mean" in batch.metrics


def _with_engine_logprobs(module, batch, shift: float):
    """Give the batch engine log-probs that differ from the trainer's by ``shift`` per token, as an engine holding
    weights of its own would."""
    trainer_lp = no_grad_logprobs(module.policy, batch, temperature=1.0, micro_batch_size=None).logprobs
    batch.rollout_logprobs = trainer_lp - shift
    batch.engine_is_policy = False
    return trainer_lp


def test_rollout_logprobs_can_stand_in_for_pi_old(tiny_path, rollout):
    module = built_module(tiny_path, mini_batches=2, old_logprobs="rollout")
    engine_lp = _with_engine_logprobs(module, rollout, 0.1)
    batch = prepared(module, rollout)
    torch.testing.assert_close(batch.old_logprobs, engine_lp - 0.1)
    with pytest.raises(ValueError, match="reports log-probs"):
        rollout.rollout_logprobs = None
        prepared(module, rollout)


def test_mismatch_is_logged_and_corrected(tiny_path, rollout):
    plain = built_module(tiny_path, mini_batches=2)
    _with_engine_logprobs(plain, rollout, 0.5)
    batch = prepared(plain, rollout)
    assert batch.metrics["sampling/logprob_diff_mean"] == pytest.approx(0.5, abs=1e-4)
    assert batch.is_weights is None
    corrected = built_module(
        tiny_path, mini_batches=2, mismatch_correction=MismatchCorrection("token", "truncate", 1.2)
    )
    batch = prepared(corrected, rollout)
    # weight exp(old - rollout) = exp(0.5) = 1.65, truncated at 1.2 on every real token
    real = batch.is_weights[batch.response_mask]
    torch.testing.assert_close(real, torch.full_like(real, 1.2))
    assert "sampling/is_weight_mean" in batch.metrics


def test_no_mismatch_is_logged_for_an_engine_that_generates_with_the_policy(tiny_path, rollout):
    """The embedded engine samples from the trainer's own module: its gap is rounding, not a mismatch."""
    assert rollout.engine_is_policy and rollout.rollout_logprobs is not None
    batch = prepared(built_module(tiny_path, mini_batches=2), rollout)
    assert not any(name.startswith("sampling/logprob_diff") for name in batch.metrics), batch.metrics


def test_token_budget_passes_put_results_back_in_order(tiny_path, rollout):
    whole = built_module(tiny_path, mini_batches=2)
    reference = prepared(whole, rollout)
    packed = built_module(tiny_path, mini_batches=2, micro_batch_tokens=30)
    packed.policy.load_state_dict(whole.policy.state_dict())
    batch = prepared(packed, rollout)
    mask = batch.response_mask
    torch.testing.assert_close(batch.old_logprobs[mask], reference.old_logprobs[mask], rtol=1e-5, atol=1e-6)
    real = rollout.attention_mask[:, None, :, None].expand_as(batch.routing)
    assert torch.equal(batch.routing[real], reference.routing[real])  # experts at every real position
