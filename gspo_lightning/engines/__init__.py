"""Rollout engines: generate G completions per prompt with the current policy."""

from gspo_lightning.engines.base import ENGINES, Generation, RolloutEngine, SamplingConfig
from gspo_lightning.engines.transformers_engine import TransformersEngine

__all__ = ["ENGINES", "Generation", "RolloutEngine", "SamplingConfig", "TransformersEngine"]
