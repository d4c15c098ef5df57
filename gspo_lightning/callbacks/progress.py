"""Progress bars that count what ``trainer.max_steps`` counts: optimizer steps.

One ``training_step`` is one rollout batch and makes ``mini_batches x epochs`` optimizer steps, so Lightning's
bars (position: rollout batches; total: remaining optimizer steps) disagreed with themselves. These bars put
``trainer.global_step`` against ``trainer.max_steps`` (a resumed run starts where its checkpoint stopped, and
the remaining-time estimate follows), and add the seconds per rollout batch (``s/rollout``) to what the module
shows (``reward``, and ``val_acc`` after a held-out evaluation). The CLI swaps Lightning's default bar for
these (:func:`use_step_progress_bar`); ``--trainer.enable_progress_bar false`` still shows none.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from typing_extensions import override


class _StepCounting:
    """What both bars share: the totals and the seconds per rollout batch (bars observe the trainer only)."""

    _last_end: float | None = None
    _seconds: float | None = None

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total: ``trainer.max_steps`` optimizer steps (inf without a step limit)."""
        steps = self.trainer.max_steps
        return steps if steps is not None and steps > 0 else float("inf")

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._seconds = now - self._last_end
        self._last_end = now

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._seconds is not None:
            items["s/rollout"] = f"{self._seconds:.2f}"
        return items


class StepRichProgressBar(_StepCounting, RichProgressBar):
    """Lightning's rich bar, counting optimizer steps (see the module docstring)."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        return "optimizer steps"

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._last_end = time.perf_counter()
        self._update(self.train_progress_bar_id, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tick()
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class StepTQDMProgressBar(_StepCounting, TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps (see the module docstring)."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._last_end = time.perf_counter()
        self.train_progress_bar.set_description("optimizer steps")
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.refresh()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tick()
        bar = self.train_progress_bar
        if bar is not None and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


def use_step_progress_bar(trainer: pl.Trainer) -> None:
    """Replace Lightning's default progress bar (exactly its own rich or tqdm bar) with the step-counting one
    of the same kind and refresh rate; a bar the user configured, or none, is left alone."""
    bar = trainer.progress_bar_callback
    if type(bar) is RichProgressBar:
        new: Any = StepRichProgressBar(refresh_rate=bar.refresh_rate, leave=bar._leave, theme=bar.theme)
    elif type(bar) is TQDMProgressBar:
        new = StepTQDMProgressBar(bar.refresh_rate, bar.process_position, leave=bar._leave)
    else:
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = new
