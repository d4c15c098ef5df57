"""The MoE families users train: routing record/replay, the change metric and the auxiliary loss."""

import pytest
import torch
import transformers

from gspo_lightning.moe import MoELayout, RoutingController, moe_layout, routing_change_frac
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
