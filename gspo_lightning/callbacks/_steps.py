"""The step number Lightning's loggers use, so callback logs line up with the module's metrics."""

from __future__ import annotations

import lightning.pytorch as pl


def logger_step(trainer: pl.Trainer) -> int:
    """Rollout batches trained so far: the x-axis of ``self.log`` under manual optimization.

    ``trainer.global_step`` counts optimizer steps (mini-batches x epochs per rollout batch), while the
    logger connector writes at the number of training steps taken; this returns the latter.
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))
