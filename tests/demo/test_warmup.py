"""The demo model's supervised warm-up: it stops at the target probe accuracy, or runs its step budget."""

from dataclasses import replace

import pytest

from gspo_lightning.demo.model import DemoSpec, build_model, supervised_warmup
from gspo_lightning.demo.tokenizer import build_char_tokenizer

SMALL = DemoSpec(hidden_size=32, num_heads=2, num_kv_heads=1, num_experts=2, expert_size=16, sft_batch_size=8)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_char_tokenizer("0123456789+=", save_dir=tmp_path_factory.mktemp("tok"))


def _model(tokenizer, spec):
    return build_model(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)


def test_stops_at_the_first_probe_that_reaches_the_target(tokenizer):
    spec = replace(SMALL, sft_steps=30, sft_probe_every=10, sft_probe_size=16, sft_target_accuracy=0.0)
    result = supervised_warmup(_model(tokenizer, spec), tokenizer, spec)
    assert result["steps"] == 10 and 0.0 <= result["probe_accuracy"] <= 1.0


def test_runs_the_whole_budget_when_the_target_is_out_of_reach_or_off(tokenizer):
    for target in (1.01, None):
        spec = replace(SMALL, sft_steps=12, sft_probe_every=5, sft_probe_size=16, sft_target_accuracy=target)
        assert supervised_warmup(_model(tokenizer, spec), tokenizer, spec)["steps"] == 12
