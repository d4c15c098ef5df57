"""R3 over multi-turn trajectories: the engine's routes cover every position the trainer forwards (appended tool /
environment tokens from the next turn's prefill), and the trainer replays them there."""

import pytest
import torch
from agent_exactness import likely_eos
from support import built_module

from gspo_lightning.data import MultiplicationTask
from gspo_lightning.engines import SamplingConfig, TransformersEngine
from gspo_lightning.models import load_causal_lm, resolve_pretrained
from gspo_lightning.rollout import PolicyLink, RolloutDataModule, RolloutOptions

CALCULATOR = "builtin:tiny-qwen3-moe-calculator-random"


@pytest.fixture(scope="module")
def calculator_path():
    return resolve_pretrained(CALCULATOR)


def _own_routes(model, batch):
    from gspo_lightning.moe import RoutingController
    from gspo_lightning.training.logprobs import response_logprobs

    controller = RoutingController(model)
    with controller.recording(batch.input_ids), torch.no_grad():
        response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1])
    return controller.chosen()


@pytest.fixture(scope="module")
def multi_turn(calculator_path):
    """A routed rollout batch of 3-turn trajectories (agent_envs.ThreeTurns) on the tiny random calculator model."""
    from agent_envs import ThreeTurns

    torch.manual_seed(0)
    model = likely_eos(load_causal_lm(calculator_path))
    dm = RolloutDataModule(
        prompts=MultiplicationTask(num_train=16, num_val=2),
        tokenizer=str(calculator_path),
        rollout=RolloutOptions(prompts_per_step=2, num_samples=2),
        sampling=SamplingConfig(max_new_tokens=6),
        engine=TransformersEngine(),
        environment=ThreeTurns,
    )
    dm.setup("fit")
    dm.connect(PolicyLink(model, report_routes=True))
    torch.manual_seed(0)
    return model, dm.next_rollout()


def test_the_engine_routes_every_forwarded_position_of_a_multi_turn_trajectory(multi_turn):
    model, batch = multi_turn
    p = batch.prompt_width
    appended = batch.attention_mask[:, p:] & ~batch.response_mask
    assert appended.any(), "the batch must hold appended (environment) tokens"
    mask = batch.rollout_routing_mask
    assert not (mask & ~batch.attention_mask).any(), "routes reported for padding"
    # every real position but each trajectory's very last token (no forward ran it, none reads its route)
    unrouted = batch.attention_mask & ~mask
    last = batch.attention_mask.long().cumsum(1).argmax(1)
    assert (unrouted.sum(1) <= 1).all() and unrouted[torch.arange(len(last)), last].sum() == unrouted.sum()
    assert mask[:, p:][appended].all(), "appended tokens are routed (from the next turn's prefill)"
    # same weights: the engine's experts are the trainer's own at every routed position
    own = _own_routes(model, batch)
    same = (own.sort(-1).values == batch.rollout_routing.sort(-1).values).all(-1).all(1)
    assert same[mask].all()


def test_rollout_replay_forces_the_engines_routes_at_every_position_of_a_trajectory(calculator_path, multi_turn):
    _, batch = multi_turn
    module = built_module(str(calculator_path), routing_replay="rollout", mini_batches=2)
    likely_eos(module.policy)
    result = module.pre_update(batch, module.policy, None, module.routing)
    replayed = module.routing.recorded()
    keep = batch.rollout_routing_mask[:, None, :, None].expand_as(replayed)
    assert torch.equal(replayed[keep], batch.rollout_routing[keep])
    mask = batch.response_mask
    torch.testing.assert_close(result.old_logprobs[mask], batch.rollout_logprobs[mask], atol=1e-5, rtol=0)
    assert (result.old_logprobs[~mask] == 0).all(), "no log-prob off the sampled tokens"
