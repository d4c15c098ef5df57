"""Loading the policy: dropout is off, so the ratio is exactly 1 at identical weights."""

import pytest
import torch
from support import built_module, prepared
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gspo_lightning import LossCounts


@pytest.fixture()
def dropout_model(tiny_path, tmp_path):
    """The tiny MoE with attention dropout 0.1, saved as a from_pretrained folder."""
    config = AutoConfig.from_pretrained(tiny_path)
    config.attention_dropout = 0.1
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(tmp_path)
    return str(tmp_path)


def _ratio_range(module, rollout):
    batch = prepared(module, rollout)  # pi_old in eval mode
    batch.advantages = torch.linspace(-1, 1, len(batch))
    module.policy.train()
    _, metrics = module.policy_loss(module.policy, batch, LossCounts.from_mask(batch.response_mask))
    return metrics["policy/ratio_min"].item(), metrics["policy/ratio_max"].item()


def test_dropout_is_disabled_so_the_ratio_is_one_at_identical_weights(dropout_model, rollout):
    module = built_module(dropout_model, mini_batches=2)
    assert _ratio_range(module, rollout) == (1.0, 1.0)
    assert module.policy.config.attention_dropout == 0.0


def test_keeping_dropout_warns_and_moves_the_ratio(dropout_model, rollout):
    with pytest.warns(UserWarning, match="disable_dropout=false"):
        module = built_module(dropout_model, mini_batches=2, disable_dropout=False)
    low, high = _ratio_range(module, rollout)
    assert low < 1.0 < high
