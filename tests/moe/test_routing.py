"""Routing Replay and moe/routing_change_frac on the tiny Qwen3-MoE."""

import pytest
import torch

from gspo_lightning import TokenRatio
from gspo_lightning.components.aggregation import LossCounts
from gspo_lightning.module import GSPOModule
from gspo_lightning.moe import RoutingController, find_routers, routing_change_frac
from gspo_lightning.training.logprobs import response_logprobs


def _module(tiny_path, **kwargs):
    module = GSPOModule(model=tiny_path, ratio=TokenRatio(), **kwargs)
    module.configure_model()
    return module


def _perturb(model, scale=0.5):
    torch.manual_seed(1)
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.add_(scale * torch.randn_like(router.weight))


def _prepare(module, batch):
    return module.pre_update(batch, module.policy, module.reference, module.routing).apply(batch)


def _step(module, batch):
    counts = LossCounts.from_mask(batch.response_mask)
    with module.routing_context(batch):
        loss, metrics = module.policy_loss(module.policy, batch, counts, module.routing)
        loss.backward()
    return metrics


def test_replay_routes_exactly_as_recorded(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=2)
    batch = _prepare(module, rollout)
    assert batch.routing is not None and batch.routing.shape[:3] == (16, 2, batch.input_ids.shape[1])
    _perturb(module.policy)  # an update that reshuffles the experts
    batch.advantages = torch.linspace(-1, 1, len(batch))  # the untrained model earns no reward
    metrics = _step(module, batch)
    assert metrics["moe/routing_change_frac"].item() == 0.0
    assert torch.equal(module.routing.recorded(), batch.routing)
    routers = find_routers(module.policy)
    assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers), "routers still learn"


def test_without_replay_the_change_fraction_is_positive(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=False, mini_batches=2)
    batch = _prepare(module, rollout)
    _perturb(module.policy)
    metrics = _step(module, batch)
    assert 0.0 < metrics["moe/routing_change_frac"].item() <= 1.0


def _logprobs(model, batch):
    return response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]).logprobs


def test_replay_changes_the_log_probs_after_a_reshuffle(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=2)
    batch = _prepare(module, rollout)
    _perturb(module.policy)
    with torch.no_grad():
        with module.routing.replaying(batch.input_ids, batch.routing):
            replayed = _logprobs(module.policy, batch)
        free = _logprobs(module.policy, batch)
    mask = batch.response_mask
    assert not torch.allclose(replayed[mask], free[mask])


def test_on_policy_ratios_are_exactly_one_with_replay(tiny_path, rollout):
    module = _module(tiny_path, routing_replay=True, mini_batches=1)
    batch = _prepare(module, rollout)
    assert batch.old_logprobs is None and batch.routing is not None
    metrics = _step(module, batch)
    assert metrics["policy/ratio_min"].item() == 1.0 and metrics["policy/ratio_max"].item() == 1.0
    assert metrics["moe/routing_change_frac"].item() == 0.0


def test_change_fraction_counts_expert_sets_on_response_tokens():
    # 1 sequence, 1 layer, prompt width 1 + 2 response tokens, k = 2
    old = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])
    new = torch.tensor([[[[7, 7], [3, 2], [4, 6]]]])  # prompt changed (ignored), same set, changed
    assert routing_change_frac(old, new, torch.tensor([[True, True]])).item() == 0.5
    assert routing_change_frac(old, new, torch.tensor([[True, False]])).item() == 0.0


def test_dense_models_are_refused(tiny_path):
    with pytest.raises(ValueError, match="no top-k router"):
        RoutingController(torch.nn.Linear(2, 2))
