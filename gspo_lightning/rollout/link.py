"""The one seam between training and generation: what the trainer side hands the data side, and back.

Data flows one way (prompts -> engine -> rewards -> batch -> update -> weights back to the engine), and these
are its only two crossings from the trainer side: once per run the module gives the data side a
:class:`PolicyLink` (the model to generate with, and whether the engine must report its MoE routes), and after
each update it sends the new weights (``sync_weights``). Nothing on the data side reads the trainer's module,
and nothing on the trainer side reads the data module beyond :class:`RolloutSide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import nn


@dataclass(frozen=True)
class PolicyLink:
    """What generation needs of the trainer, given once per run.

    Attributes:
        policy: the model the trainer optimises (the transformers model, or its peft wrapper); engines generate
            with it (in place) or copy its weights.
        report_routes: the engine must report each sequence's MoE routes (Rollout Routing Replay, or the
            rollout-routing metric); engines that decide at build time are told before they build.
    """

    policy: nn.Module
    report_routes: bool = False


@runtime_checkable
class RolloutSide(Protocol):
    """What the trainer side may call on the data side (``RolloutDataModule`` implements it)."""

    def connect(self, link: PolicyLink) -> None:
        """Take the policy to generate with (before the first generation)."""

    def sync_weights(self, policy: nn.Module) -> bool:
        """Send the updated weights to the rollout engine; returns whether it copied any."""


def rollout_side(trainer: pl.Trainer) -> RolloutSide:
    """The trainer's data module, as the trainer side may use it.

    Raises:
        RuntimeError: the trainer has no data module implementing :class:`RolloutSide`.
    """
    datamodule = trainer.datamodule
    if not isinstance(datamodule, RolloutSide):
        raise RuntimeError(
            "GSPOModule needs a RolloutDataModule (pass datamodule=RolloutDataModule(...) to the Trainer):"
            " rollouts are generated on the data side with the policy this module trains."
        )
    return datamodule
