"""The MoE families users train: routing record/replay, the change metric and the auxiliary loss."""

import pytest
import torch
import transformers

from gspo_lightning.moe import MoELayout, RoutingController, moe_layout, routing_change_frac
from gspo_lightning.moe.routing import routing_controller
from gspo_lightning.training.logprobs import response_logprobs

SMALL = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8),
    "Qwen2MoeConfig": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
    ),
    "MixtralConfig": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16),
    "OlmoeConfig": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=16),
}


def _model(config_name: str):
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(**SMALL, **FAMILIES[config_name])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config_name", list(FAMILIES))
def test_record_replay_and_aux_loss(config_name):
    model = _model(config_name)
    assert moe_layout(model.config) == MoELayout(num_experts=4, top_k=2)
    control = RoutingController(model)
    assert control.num_layers == 2
    ids = torch.randint(1, 32, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    with control.recording(ids), torch.no_grad():
        response_logprobs(model, ids, mask, 3)
    recorded = control.recorded()
    assert recorded.shape == (3, 2, 7, 2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name and "proj" not in name:
                param.add_(torch.randn_like(param))
    with control.replaying(ids, recorded):
        out = response_logprobs(model, ids, mask, 3, output_router_logits=True)
    assert torch.equal(control.recorded(), recorded)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    (out.logprobs.sum() + out.aux_loss).backward()
    with control.recording(ids), torch.no_grad():
        response_logprobs(model, ids, mask, 3)
    assert routing_change_frac(recorded, control.recorded(), torch.ones(3, 3, dtype=torch.bool)) > 0


@pytest.mark.parametrize("config_name", list(FAMILIES))
def test_replay_of_a_models_own_routing_is_the_identity(config_name):
    model = _model(config_name)
    assert RoutingController(model).routers_replay_unchanged() == []
    assert routing_controller(model, moe_layout(model.config), True, True, 0.0) is not None


def _deepseek_v3():
    config = transformers.DeepseekV3Config(
        **{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 2},
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        moe_intermediate_size=16,
        intermediate_size=32,
        n_shared_experts=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a trained router's score-correction bias is not zero
        for router in RoutingController(model).routers:
            router.e_score_correction_bias.normal_()
    return model


def test_replay_is_refused_where_it_would_change_the_model():
    # DeepSeek-V3 routes with sigmoid scores plus a bias and a scaling factor: replaying its own routing through a
    # softmax moved its log-probs by 3e-2
    model = _deepseek_v3()
    ids, mask = torch.randint(1, 32, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    control = RoutingController(model)
    with control.recording(ids), torch.no_grad():
        own = response_logprobs(model, ids, mask, 3).logprobs
    with control.replaying(ids, control.recorded()), torch.no_grad():
        replayed = response_logprobs(model, ids, mask, 3).logprobs
    assert not torch.allclose(own, replayed)
    assert control.routers_replay_unchanged()
    for mode in ("old", "rollout"):  # R3 recomputes the weights the same way: refused alike
        with pytest.raises(ValueError, match="routing_replay: replaying a model's own routing changes it for Deepseek"):
            routing_controller(model, moe_layout(model.config), mode, True, 0.0)
    assert routing_controller(model, moe_layout(model.config), "off", True, 0.0) is not None  # the metric still works
