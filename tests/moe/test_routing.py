"""Routing Replay and moe/routing_change_frac on the tiny Qwen3-MoE."""

import pytest
import torch
from support import built_module, perturb_routers, prepared

from gspo_lightning import TokenRatio
from gspo_lightning.components.aggregation import LossCounts
from gspo_lightning.moe import RoutingController, find_routers, routing_change_frac
from gspo_lightning.training.logprobs import response_logprobs


def _module(tiny_path, **kwargs):
    return built_module(tiny_path, ratio=TokenRatio(), **kwargs)


def _step(module, batch):
    counts = LossCounts.from_mask(batch.response_mask)
    with module.routing_context(batch):
        loss, metrics = module.policy_loss(module.policy, batch, counts, module.routing)
        loss.backward()
    return metrics


def test_replay_routes_exactly_as_recorded(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=2)
    batch = prepared(module, rollout)
    assert batch.routing is not None and batch.routing.shape[:3] == (16, 2, batch.input_ids.shape[1])
    perturb_routers(module.policy)  # an update that reshuffles the experts
    batch.advantages = torch.linspace(-1, 1, len(batch))  # the untrained model earns no reward
    metrics = _step(module, batch)
    assert torch.equal(module.routing.recorded(), batch.routing)
    # the routers' own choice is still measured under replay: the reshuffle stays visible
    assert metrics["moe/routing_change_frac"].item() > 0.0
    assert not torch.equal(module.routing.chosen(), batch.routing)
    routers = find_routers(module.policy)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers), "routers still learn"


def test_without_replay_the_change_fraction_is_positive(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=False, mini_batches=2)
    batch = prepared(module, rollout)
    perturb_routers(module.policy)
    metrics = _step(module, batch)
    assert 0.0 < metrics["moe/routing_change_frac"].item() <= 1.0


def _logprobs(model, batch):
    return response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]).logprobs


def test_replay_changes_the_log_probs_after_a_reshuffle(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=2)
    batch = prepared(module, rollout)
    perturb_routers(module.policy)
    with torch.no_grad():
        with module.routing.replaying(batch.input_ids, batch.routing):
            replayed = _logprobs(module.policy, batch)
        free = _logprobs(module.policy, batch)
    mask = batch.response_mask
    assert not torch.allclose(replayed[mask], free[mask])


def test_on_policy_ratios_are_exactly_one_with_replay(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=1)
    batch = prepared(module, rollout)
    assert batch.old_logprobs is None and batch.routing is not None
    metrics = _step(module, batch)
    assert metrics["policy/ratio_min"].item() == 1.0 and metrics["policy/ratio_max"].item() == 1.0
    assert metrics["moe/routing_change_frac"].item() == 0.0


def test_change_fraction_reads_the_positions_that_compute_each_response_log_prob():
    # 1 sequence, 1 layer, prompt width 1 + 2 response tokens, k = 2. Response token j's log-prob comes from
    # the logits at position P-1+j: positions 0 (last prompt position) and 1 count, position 2 does not.
    old = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])
    new = torch.tensor([[[[7, 7], [3, 2], [4, 6]]]])  # changed, same set, changed (after the last log-prob)
    assert routing_change_frac(old, new, torch.tensor([[True, True]])).item() == 0.5
    assert routing_change_frac(old, new, torch.tensor([[True, False]])).item() == 1.0
    assert routing_change_frac(old, old, torch.tensor([[True, True]])).item() == 0.0


def test_a_changed_last_prompt_position_moves_the_first_log_prob_and_the_metric(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=2)
    batch = prepared(module, rollout)
    p = batch.prompt_width
    moved = batch.routing.clone()
    moved[:, :, p - 1] = (moved[:, :, p - 1].long() + 1) % module.moe.num_experts  # other experts there only
    with torch.no_grad():
        with module.routing.replaying(batch.input_ids, batch.routing):
            before = _logprobs(module.policy, batch)
        with module.routing.replaying(batch.input_ids, moved):
            after = _logprobs(module.policy, batch)
    first = batch.response_mask[:, 0]
    assert not torch.allclose(before[first, 0], after[first, 0])  # response token 0 depends on position P-1
    assert routing_change_frac(batch.routing, moved, batch.response_mask).item() > 0


def test_dense_models_are_refused(tiny_path):
    with pytest.raises(ValueError, match="no top-k router"):
        RoutingController(torch.nn.Linear(2, 2))


def test_padding_free_records_and_replays_the_same_routes(tiny_path, rollout):
    # pi_old's routes recorded padding-free equal the padded pass's at every real position, and replaying them
    # in a packed update forward forces exactly those experts and gives the padded path's loss and metrics
    padded_module = _module(tiny_path, routing_replay=True, mini_batches=2)
    packed_module = _module(tiny_path, routing_replay=True, mini_batches=2, padding_free=True)
    packed_module.policy.load_state_dict(padded_module.policy.state_dict())
    padded, packed = prepared(padded_module, rollout), prepared(packed_module, rollout)
    real = padded.attention_mask.bool()[:, None, :, None].expand_as(padded.routing)
    assert torch.equal(packed.routing[real], padded.routing[real])
    assert (packed.routing[~real] == 0).all()
    torch.testing.assert_close(packed.old_logprobs, padded.old_logprobs, rtol=1e-5, atol=1e-5)
    results = []
    for module, batch in ((padded_module, padded), (packed_module, packed)):
        perturb_routers(module.policy)
        batch.advantages = torch.linspace(-1, 1, len(batch))
        results.append(_step(module, batch))
        assert torch.equal(module.routing.recorded()[real], batch.routing[real])  # replayed as recorded
    for name in ("policy/loss", "moe/routing_change_frac", "policy/entropy"):
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-5)
    assert results[0]["moe/routing_change_frac"] > 0
