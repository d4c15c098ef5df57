"""The loss of one micro-batch: micro-batching reproduces the whole-batch gradient; mismatch weights apply."""

import pytest
import torch
from support import built_module, prepared

from gspo_lightning import LossCounts
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.training.splits import micro_batches


def _grads(module, batch):
    """The gradient of the batch's loss accumulated over the module's micro-batches (size or token budget)."""
    module.policy.zero_grad()
    counts = LossCounts.from_mask(batch.response_mask)
    batching = module.options.batching
    for _, piece in micro_batches(batch, batching.micro_batch_size, batching.micro_batch_tokens):
        with module.routing_context(piece):
            loss, _ = module.policy_loss(module.policy, piece, counts, module.routing)
            loss.backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_path, rollout, aggregation):
    options = dict(mini_batches=2, aggregation=aggregation, max_new_tokens=8, entropy_coef=0.01)
    whole = built_module(tiny_path, **options)
    batch = prepared(whole, rollout)
    # make the advantages non-trivial even if all rewards happened to be equal
    batch.advantages = torch.linspace(-1, 1, len(batch))
    g_whole = _grads(whole, batch)
    micro = built_module(tiny_path, **options, micro_batch_size=3)
    micro.policy.load_state_dict(whole.policy.state_dict())
    g_micro = _grads(micro, batch)
    torch.testing.assert_close(g_micro, g_whole, rtol=1e-4, atol=1e-6)
    assert g_whole.abs().sum() > 0


def test_mismatch_weights_scale_the_token_losses(tiny_path, rollout):
    module = built_module(tiny_path, mini_batches=2, mismatch_correction=MismatchCorrection("token", "truncate", 1.2))
    lp = module.pre_update(rollout, module.policy).old_logprobs
    rollout.rollout_logprobs = lp - 0.5  # every weight exp(0.5) = 1.65, truncated at 1.2
    batch = prepared(module, rollout)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    counts = LossCounts.from_mask(batch.response_mask)
    weighted, _ = module.policy_loss(module.policy, batch, counts)
    batch.is_weights = None
    unweighted, _ = module.policy_loss(module.policy, batch, counts)
    torch.testing.assert_close(weighted, 1.2 * unweighted)


@pytest.mark.parametrize("padding_free", [False, True])
def test_token_budget_micro_batches_give_the_whole_batch_gradient(tiny_path, rollout, padding_free):
    options = dict(mini_batches=2, aggregation="seq-mean-token-mean", entropy_coef=0.01)
    whole = built_module(tiny_path, **options)
    batch = prepared(whole, rollout)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    g_whole = _grads(whole, batch)
    packed = built_module(tiny_path, **options, micro_batch_tokens=40, padding_free=padding_free)
    packed.policy.load_state_dict(whole.policy.state_dict())
    parts = micro_batches(batch, tokens=40)
    assert len(parts) > 2 and any(part.input_ids.shape[1] < batch.input_ids.shape[1] for _, part in parts)
    g_packed = _grads(packed, batch)
    torch.testing.assert_close(g_packed, g_whole, rtol=1e-4, atol=1e-6)
