"""The loss of one micro-batch: micro-batching reproduces the whole-batch gradient; mismatch weights apply."""

import pytest
import torch
from support import accumulated_grads, built_module, prepared

from gspo_lightning import LossCounts
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.training.logprobs import response_logprobs
from gspo_lightning.training.splits import micro_batches


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_give_the_whole_batch_gradient(tiny_path, rollout, aggregation):
    options = dict(mini_batches=2, aggregation=aggregation, max_new_tokens=8, entropy_coef=0.01)
    whole = built_module(tiny_path, **options)
    batch = prepared(whole, rollout)
    # make the advantages non-trivial even if all rewards happened to be equal
    batch.advantages = torch.linspace(-1, 1, len(batch))
    g_whole = accumulated_grads(whole, batch)
    micro = built_module(tiny_path, **options, micro_batch_size=3)
    micro.policy.load_state_dict(whole.policy.state_dict())
    g_micro = accumulated_grads(micro, batch)
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
    g_whole = accumulated_grads(whole, batch)
    packed = built_module(tiny_path, **options, micro_batch_tokens=40, padding_free=padding_free)
    packed.policy.load_state_dict(whole.policy.state_dict())
    parts = micro_batches(batch, tokens=40)
    assert len(parts) > 2 and any(part.input_ids.shape[1] < batch.input_ids.shape[1] for _, part in parts)
    g_packed = accumulated_grads(packed, batch)
    torch.testing.assert_close(g_packed, g_whole, rtol=1e-4, atol=1e-6)


def _with_an_empty_response(batch):
    """``batch`` with sequence 0's response emptied (its prompt is still routed) and zero advantages, so the
    policy term has no gradient and the loss is the MoE auxiliary term alone."""
    width = batch.response_mask.shape[1]
    batch.response_mask[0] = False
    batch.attention_mask[0, -width:] = False
    batch.advantages = torch.zeros(len(batch))
    return batch


def _aux_grads(module, batch, size, reference=False):
    """The accumulated gradient of the loss over micro-batches of ``size``, or (``reference``) of the documented
    sum: each micro-batch's own load-balancing loss x its share of the sequences with a response, n'_micro / N'."""
    module.policy.zero_grad()
    counts = LossCounts.from_mask(batch.response_mask)
    coef = module.policy_loss.router_aux_loss_coef
    for _, piece in micro_batches(batch, size):
        with module.routing_context(piece):
            if reference:
                out = response_logprobs(
                    module.policy, piece.input_ids, piece.attention_mask, piece.response_mask.shape[1],
                    output_router_logits=True,
                )  # fmt: skip
                loss = coef * out.aux_loss * piece.response_mask.any(-1).sum() / counts.num_seqs
            else:
                loss, _ = module.policy_loss(module.policy, piece, counts, module.routing)
            loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.policy.parameters()]
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("size", [None, 2, 1])
def test_the_aux_loss_is_each_micro_batch_s_own_weighted_by_its_share_of_sequences(tiny_path, rollout, size):
    module = built_module(tiny_path, mini_batches=2, router_aux_loss_coef=0.5)
    batch = _with_an_empty_response(prepared(module, rollout))
    got = _aux_grads(module, batch, size)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, _aux_grads(module, batch, size, reference=True), rtol=1e-5, atol=1e-7)


def test_a_mini_batch_forwarded_whole_gets_the_model_s_own_aux_loss(tiny_path, rollout):
    # the shares of the micro-batches add up to 1, even with a sequence whose response is empty
    module = built_module(tiny_path, mini_batches=2, router_aux_loss_coef=0.5)
    batch = _with_an_empty_response(prepared(module, rollout))
    loss, metrics = module.policy_loss(module.policy, batch, LossCounts.from_mask(batch.response_mask))
    torch.testing.assert_close(loss.detach(), 0.5 * metrics["moe/aux_loss"])


def test_the_aux_loss_depends_on_the_split(tiny_path, rollout):
    # documented (docs/algorithms.md): the load-balancing statistic is each forward's own, not the mini-batch's
    module = built_module(tiny_path, mini_batches=2, router_aux_loss_coef=0.5)
    batch = _with_an_empty_response(prepared(module, rollout))
    whole, single = _aux_grads(module, batch, None), _aux_grads(module, batch, 1)
    assert not torch.allclose(whole, single, rtol=1e-2, atol=0)
