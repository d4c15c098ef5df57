"""The optimizer and learning-rate schedule of the policy, from the factories LightningCLI builds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def build_optimizers(
    params: Iterable[torch.nn.Parameter],
    optimizer: OptimizerCallable | None = None,
    lr_scheduler: LRSchedulerCallable | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer (default ``AdamW(lr=1e-6, weight_decay=0)``) over
    the trainable ``params``, with the scheduler stepped once per optimizer step when one is given."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0) if optimizer is None else optimizer(params)
    if lr_scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt)}}
