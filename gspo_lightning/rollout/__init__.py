"""The data side's orchestration: prompts -> engine -> rewards -> :class:`RolloutBatch`, and held-out evaluation.

The stages themselves are packages of their own (``data`` for prompts, ``engines``, ``rewards``); this package
puts them together and owns the seam to the trainer:

- ``collector``: one rollout batch of single-turn completions (G per prompt, DAPO dynamic sampling); multi-turn
  agent loops belong beside it, producing the same :class:`RolloutBatch`;
- ``datamodule``: :class:`RolloutDataModule`, the Lightning data module: prompt order, seeded streams, exact
  resume, the train and held-out dataloaders (``streams``), the prompt splits (``prompt_set``);
- ``pipeline`` and ``asynchronous``: bounded-staleness rollouts (``data.max_staleness``) generated on a thread
  from the engine's own copy of the weights, version by version, and the batches in flight a checkpoint keeps;
- ``evaluation``: held-out results and the accuracy figures made from them;
- ``options``: the data module's option groups (``data.rollout``, ``data.encoding``, ``data.heldout``);
- ``link``: the one seam with the trainer (:class:`PolicyLink` in, ``sync_weights`` back).
"""

from gspo_lightning.rollout.collector import RolloutCollector, rollout_metrics
from gspo_lightning.rollout.datamodule import RolloutDataModule
from gspo_lightning.rollout.evaluation import EvalResult, eval_metrics, heldout_accuracy
from gspo_lightning.rollout.link import PolicyLink, RolloutSide, rollout_side
from gspo_lightning.rollout.options import EncodingOptions, HeldOutOptions, RolloutOptions

__all__ = [
    "EncodingOptions",
    "EvalResult",
    "HeldOutOptions",
    "PolicyLink",
    "RolloutCollector",
    "RolloutDataModule",
    "RolloutOptions",
    "RolloutSide",
    "eval_metrics",
    "heldout_accuracy",
    "rollout_metrics",
    "rollout_side",
]
