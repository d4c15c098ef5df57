"""Rollout engines: generate G completions per prompt with the current policy."""

from gspo_lightning.engines.base import ENGINES, Generation, RolloutEngine, SamplingConfig
from gspo_lightning.engines.transformers_engine import TransformersEngine
from gspo_lightning.engines.vllm_engine import VLLMEngine  # imports vLLM only when an engine is built
from gspo_lightning.engines.vllm_server import VLLMServerEngine  # HTTP only: no vLLM in this process

__all__ = [
    "ENGINES",
    "Generation",
    "RolloutEngine",
    "SamplingConfig",
    "TransformersEngine",
    "VLLMEngine",
    "VLLMServerEngine",
]
