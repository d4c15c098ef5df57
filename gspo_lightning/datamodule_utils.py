"""Finding the rollout data module from the training side."""

from __future__ import annotations


def rollout_datamodule(trainer):
    """The trainer's RolloutDataModule (anything with ``bind_policy`` and ``sync_weights``).

    Raises:
        RuntimeError: the trainer has no such data module.
    """
    dm = getattr(trainer, "datamodule", None)
    if dm is None or not hasattr(dm, "bind_policy"):
        raise RuntimeError(
            "GSPOModule needs a RolloutDataModule (pass datamodule=RolloutDataModule(...) to the Trainer):"
            " rollouts are generated on the data side with the policy this module trains."
        )
    return dm
