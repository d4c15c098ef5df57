"""Rollout Routing Replay (R3): the engine reports its MoE routes, the trainer replays them, the mismatch metric."""

import copy
import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from support import addition_datamodule, built_module, grouped, perturb_routers, prepared

from gspo_lightning.engines import TransformersEngine
from gspo_lightning.moe import RoutingController
from gspo_lightning.moe.routing import rollout_mismatch_counts
from gspo_lightning.rollout import PolicyLink
from gspo_lightning.rollout.collector import _join_routes
from gspo_lightning.training.logprobs import response_logprobs
from gspo_lightning.training.options import MoEOptions


def _routed_rollout(tiny_path, model, engine=None):
    dm = addition_datamodule(tiny_path, engine)
    dm.connect(PolicyLink(model, report_routes=True))
    torch.manual_seed(0)
    return dm.next_rollout()


@pytest.fixture()
def routed(tiny_path, tiny_model):
    return _routed_rollout(tiny_path, tiny_model)


def _own_routes(model, batch):
    controller = RoutingController(model)
    with controller.recording(batch.input_ids), torch.no_grad():
        response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    return controller.chosen()


def _counts(batch, trainer_routes):
    return rollout_mismatch_counts(
        batch.rollout_routing, batch.rollout_routing_mask, trainer_routes, batch.response_mask
    )


@pytest.mark.parametrize(
    "engine_kwargs", [{}, {"use_cache": False}, {"batch_size": 1}], ids=["cache", "no-cache", "chunks"]
)
def test_the_engine_reports_its_routes_for_every_position_a_log_prob_reads(tiny_path, tiny_model, engine_kwargs):
    batch = _routed_rollout(tiny_path, tiny_model, TransformersEngine(**engine_kwargs))
    n, width = batch.input_ids.shape
    assert batch.rollout_routing.shape == (n, 2, width, 2) and batch.rollout_routing.dtype == torch.uint8
    mask = batch.rollout_routing_mask
    assert not (mask & ~batch.attention_mask).any(), "routes reported for padding"
    assert mask[:, : batch.prompt_width].equal(batch.attention_mask[:, : batch.prompt_width])
    differing, routed, unrouted = _counts(batch, _own_routes(tiny_model, batch))
    assert unrouted == 0 and routed == batch.response_mask.sum()
    # the engine ran these weights: its experts are the trainer's own, position by position
    assert differing.tolist() == [0, 0]
    own = _own_routes(tiny_model, batch)
    same = (own.sort(-1).values == batch.rollout_routing.sort(-1).values).all(-1).all(1)  # (n, S)
    assert same[mask].all()


def test_a_one_column_shift_of_the_engine_routes_is_caught(routed, tiny_model):
    shifted = dataclasses.replace(routed, rollout_routing=routed.rollout_routing.roll(1, dims=2))
    differing, routed_count, _ = _counts(shifted, _own_routes(tiny_model, routed))
    assert (differing / routed_count > 0.2).all()


def test_rollout_replay_reproduces_the_engines_log_probs_and_routes(tiny_path, routed):
    module = built_module(tiny_path, routing_replay="rollout", mini_batches=2)
    result = module.pre_update(routed, module.policy, None, module.routing)
    assert torch.equal(result.routing, routed.rollout_routing) and torch.equal(
        result.routing_mask, routed.rollout_routing_mask
    )
    # the trainer's experts are the engine's wherever it reported them, and its pi_old is the engine's log-probs
    replayed = module.routing.recorded()  # the last micro-batch is the whole batch here
    keep = routed.rollout_routing_mask[:, None, :, None].expand_as(replayed)
    assert torch.equal(replayed[keep], routed.rollout_routing[keep])
    mask = routed.response_mask
    torch.testing.assert_close(result.old_logprobs[mask], routed.rollout_logprobs[mask], atol=1e-5, rtol=0)
    differing, routed_count, unrouted = result.rollout_mismatch
    assert differing.tolist() == [0, 0] and routed_count > 0 and unrouted == 0


def test_replaying_a_batchs_own_routes_is_the_identity(tiny_path, routed):
    replaying = built_module(tiny_path, routing_replay="rollout", mini_batches=2)
    plain = built_module(tiny_path, routing_replay="off", mini_batches=2)
    with_replay = replaying.pre_update(routed, replaying.policy, None, replaying.routing).old_logprobs
    without = plain.pre_update(routed, plain.policy, None, plain.routing).old_logprobs
    torch.testing.assert_close(with_replay, without, atol=1e-6, rtol=0)


def test_stale_engine_weights_show_a_mismatch_and_replay_still_forces_the_engines_routes(tiny_path, routed):
    module = built_module(tiny_path, routing_replay="rollout", mini_batches=2)
    perturb_routers(module.policy)  # the trainer moved on, the engine did not receive the weights
    result = module.pre_update(routed, module.policy, None, module.routing)
    differing, routed_count, _ = result.rollout_mismatch
    assert (differing / routed_count > 0).all()
    replayed = module.routing.recorded()
    keep = routed.rollout_routing_mask[:, None, :, None].expand_as(replayed)
    assert torch.equal(replayed[keep], routed.rollout_routing[keep])
    plain = built_module(tiny_path, routing_replay="off", mini_batches=2)
    perturb_routers(plain.policy)
    natural = plain.pre_update(routed, plain.policy, None, plain.routing).old_logprobs
    assert not torch.allclose(result.old_logprobs, natural, atol=1e-4), "replay changed nothing"


def test_positions_without_an_engine_route_route_naturally(tiny_path, routed):
    module = built_module(tiny_path, routing_replay="rollout", mini_batches=2)
    wrong = (routed.rollout_routing.long() + 3) % 8  # a different expert set at every position
    p = routed.prompt_width
    unreported = torch.zeros_like(routed.rollout_routing_mask)
    unreported[:, p:] = True  # the engine reported nothing for the response positions
    kept = routed.rollout_routing.clone()
    kept[:, :, p:] = wrong[:, :, p:].to(kept.dtype)
    masked = dataclasses.replace(
        routed, rollout_routing=kept, rollout_routing_mask=routed.rollout_routing_mask & ~unreported
    )
    result = module.pre_update(masked, module.policy, None, module.routing)
    reference = module.pre_update(routed, module.policy, None, module.routing)
    mask = routed.response_mask
    # response log-probs read positions P-1 .. P+T-2: all but the first are unreported, so they route naturally
    torch.testing.assert_close(result.old_logprobs[:, 1:][mask[:, 1:]], reference.old_logprobs[:, 1:][mask[:, 1:]])
    assert result.rollout_mismatch[2] > 0, "unreported response positions are counted"
    forced = dataclasses.replace(masked, rollout_routing_mask=routed.rollout_routing_mask)
    wrong_result = module.pre_update(forced, module.policy, None, module.routing)
    assert not torch.allclose(wrong_result.old_logprobs[mask], reference.old_logprobs[mask], atol=1e-4)


def test_the_collector_pads_routes_like_the_tokens():
    groups = []
    for p, t in [(3, 5), (6, 2)]:
        prompt = torch.randint(1, 50, (2, p))
        response = torch.randint(1, 50, (2, t))
        tokens = torch.cat([prompt, response], 1)
        groups.append(
            {
                "prompt_ids": prompt,
                "response_ids": response,
                "routes": tokens[:, None, :, None].expand(2, 3, p + t, 2).to(torch.uint8),
                "route_mask": torch.ones(2, p + t, dtype=torch.bool),
            }
        )
    routes, mask = _join_routes(groups, 6, 5)
    prompts = torch.cat([torch.nn.functional.pad(g["prompt_ids"], (6 - g["prompt_ids"].shape[1], 0)) for g in groups])
    responses = torch.cat(
        [torch.nn.functional.pad(g["response_ids"], (0, 5 - g["response_ids"].shape[1])) for g in groups]
    )
    ids = torch.cat([prompts, responses], 1)
    assert routes.shape == (4, 3, 11, 2) and torch.equal(mask, ids > 0)
    assert torch.equal(routes[:, 1, :, 0].long(), ids)


def test_routing_replay_options():
    modes = [MoEOptions(routing_replay=v).replay for v in (True, False, "old", "rollout", "off")]
    assert modes == ["old", "off", "old", "rollout", "off"]
    with pytest.raises(ValueError, match="routing_replay='r3'"):
        MoEOptions(routing_replay="r3")


def test_rollout_replay_refuses_a_batch_without_engine_routes(tiny_path, rollout):
    module = built_module(tiny_path, routing_replay="rollout", mini_batches=2)
    with pytest.raises(ValueError, match="routing_replay: rollout needs the engine's MoE routes"):
        prepared(module, rollout)


class _Mismatch(pl.Callback):
    def __init__(self):
        self.per_layer = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_layer.append(outputs["router_stats"].rollout_mismatch.tolist())


@pytest.mark.parametrize("on_policy", [False, True], ids=["pre-update-pass", "first-mini-batch"])
def test_a_fit_measures_the_mismatch_zero_in_sync_and_positive_when_the_engine_is_stale(
    tiny_path, tiny_model, on_policy
):
    from gspo_lightning.module import GSPOModule

    optimizer = lambda params: torch.optim.SGD(params, lr=5.0)  # noqa: E731 - moves the routers at once
    # the random model earns no reward (advantages 0): the load-balancing loss alone moves the routers
    kwargs = {"mini_batches": 1} if on_policy else {"mini_batches": 2, "padding_free": True, "micro_batch_tokens": 64}
    runs = {}
    for stale in (False, True):
        module = GSPOModule(
            **grouped("model", model=tiny_path, routing_replay="rollout", optimizer=optimizer, router_aux_loss_coef=1.0,
                      **kwargs)
        )  # fmt: skip
        dm = addition_datamodule(tiny_path)
        if stale:  # the engine keeps generating with the initial weights: as if every weight sync were skipped
            dm.engine.request_routes()
            dm.engine.bind(copy.deepcopy(tiny_model))
        probe = _Mismatch()
        trainer = pl.Trainer(
            max_steps=3 * kwargs["mini_batches"], accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[probe], limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, dm)
        runs[stale] = probe.per_layer
    assert runs[False] == [[0.0, 0.0]] * 3, runs
    assert runs[True][0] == [0.0, 0.0] and all(max(layers) > 0 for layers in runs[True][1:]), runs
