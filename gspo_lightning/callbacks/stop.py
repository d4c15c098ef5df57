"""`GracefulStop`: a SIGTERM (a plain ``kill``, a scheduler's preemption) stops a run at once, with a
checkpoint, one line naming it and the resume command, and exit status 143.

Lightning 2.6 notes the signal itself (``trainer.received_sigterm``, set by its ``_SignalConnector``) and stops
with ``SIGTERMException`` at the end of the rollout batch under way, exiting 0 and saving nothing of its own.
This callback adds what a run needs: the embedded engine checks the flag after every decoding step (its
``stop_requested`` hook), so a long generation ends within a step; the rollout batch being generated is
discarded (nothing trains on it, and the data module's position in the prompt order is put back before it);
the checkpoint of the optimizer steps taken is written; and ``gspo-lightning`` turns the stop into one line and
exit status 143 (128 + SIGTERM, what shells report for a process ended by SIGTERM and what schedulers requeue
on) in :func:`gspo_lightning.cli.main`.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from gspo_lightning.engines.transformers_engine import GenerationStopped

STOPPED_EXIT_CODE = 143  # 128 + SIGTERM
STOP_EXCEPTIONS = (SIGTERMException, GenerationStopped)
"""What a SIGTERM ends ``fit`` / ``validate`` with: Lightning's between batches, the engine's mid-generation."""


@dataclass(frozen=True)
class StopReport:
    """Where a run stopped by SIGTERM stands; :class:`GracefulStop` attaches it to the exception as
    ``stop_report``."""

    fitting: bool
    step: int
    max_steps: int
    checkpoint: Path | None
    discarded: bool  # a rollout batch in progress was dropped
    global_zero: bool


class GracefulStop(Callback):
    """On SIGTERM: stop between decoding steps, discard the rollout batch in progress, write a checkpoint.

    The checkpoint goes where the first ModelCheckpoint writes (``last.ckpt`` with ``save_last``, else its
    step file name). With several ranks the engine is not interrupted mid-generation (the ranks would not stop
    at the same decoding step): the stop comes at the end of the rollout batch, through Lightning.
    """

    def __init__(self) -> None:
        self._data_state: dict[str, Any] | None = None
        self._in_batch = False
        self._engine: Any = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = getattr(trainer.datamodule, "engine", None)
        if trainer.world_size == 1 and hasattr(engine, "stop_requested"):
            engine.stop_requested = lambda: trainer.received_sigterm
            self._engine = engine

    def _release_engine(self) -> None:
        if self._engine is not None:
            self._engine.stop_requested = None
            self._engine = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release_engine()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        # before training_step pulls (generates) the rollout batch
        datamodule = trainer.datamodule
        self._data_state = copy.deepcopy(datamodule.state_dict()) if datamodule is not None else None
        self._in_batch = True

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._in_batch = False

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release_engine()
        if not isinstance(exception, STOP_EXCEPTIONS):
            return
        fitting = trainer.state.fn == TrainerFn.FITTING
        discarded = fitting and self._in_batch
        if discarded and self._data_state is not None:
            trainer.datamodule.load_state_dict(self._data_state)  # its prompts come again after the resume
        path = self._save(trainer) if fitting and trainer.global_step > 0 else None
        exception.stop_report = StopReport(
            fitting, trainer.global_step, trainer.max_steps, path, discarded, trainer.is_global_zero
        )

    @staticmethod
    def _save(trainer: pl.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if callback is None or callback.dirpath is None:
            return None
        metrics = {
            **trainer.callback_metrics,
            "epoch": torch.tensor(trainer.current_epoch),
            "step": torch.tensor(trainer.global_step),
        }
        name = callback.CHECKPOINT_NAME_LAST if callback.save_last else None
        path = Path(callback.format_checkpoint_name(metrics, name))
        trainer.save_checkpoint(path, weights_only=callback.save_weights_only)
        return path


def resume_command(args: Sequence[str]) -> str:
    """``gspo-lightning <args>`` with ``--ckpt_path last`` in place of any ``--ckpt_path``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return shlex.join(["gspo-lightning", *kept, "--ckpt_path", "last"])


def stopped_message(report: StopReport | None, args: Sequence[str]) -> str:
    """The line ``gspo-lightning`` ends a run stopped by SIGTERM with (``args``: its command line)."""
    if report is None or not report.fitting:
        return "SIGTERM: stopped early, before the end; nothing was saved."
    of = f" of {report.max_steps}" if report.max_steps > 0 else ""
    line = f"SIGTERM: the run stopped early at step {report.step}{of}"
    if report.discarded:
        line += "; the rollout batch in progress was discarded (not trained on)"
    if report.step == 0:
        return f"{line}, before its first optimizer step: nothing to resume, run the same command again."
    if report.checkpoint is None:
        return f"{line}; no checkpoint was written (no ModelCheckpoint: checkpointing is off)."
    resume = resume_command(args) if args and args[0] == "fit" else "the same command plus --ckpt_path last"
    return f"{line}; checkpoint: {report.checkpoint}; resume with: {resume}"
