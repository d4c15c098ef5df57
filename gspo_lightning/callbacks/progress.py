"""Progress bars that count what ``trainer.max_steps`` counts: optimizer steps.

One ``training_step`` is one rollout batch and makes ``mini_batches x epochs`` optimizer steps, so Lightning's
bars (position: rollout batches; total: optimizer steps) disagreed with themselves. These bars put
``trainer.global_step`` against ``trainer.max_steps``: the number the user configured, the ``step=`` of the
checkpoint files and of ``every_n_train_steps``. The total is rounded up to whole rollout batches once the
first one shows how many optimizer steps a rollout batch makes (training stops after whole rollout batches),
and a resumed run starts at its checkpoint's step.

The remaining-time estimate and the rate are the average since the bar (re)started, counted from where it
started: a resumed run's jump to its checkpoint's step is no progress, and rich's own estimate, which forgets
updates older than 30 s, would show none once a rollout batch takes longer. The bars add ``s/rollout`` (the
seconds the last rollout batch took, generation and update, without the held-out evaluation) to what the module
shows (``reward``, and ``val_acc`` after a held-out evaluation).

The CLI swaps Lightning's default bar for these (:func:`use_step_progress_bar`); ``--trainer.enable_progress_bar
false`` still shows none. Without a terminal (nohup, SLURM, CI logs: a bar's redraws are lost there) it prints a
plain line instead (:class:`StepLineProgress`): after the first rollout batch, at most every ``every_s`` seconds
after that, after each held-out evaluation and at the end, with the step, the reward, ``s/rollout`` and the ETA.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from typing_extensions import override

DESCRIPTION = "optimizer steps"


def final_step(first_step: int, max_steps: int, steps_per_batch: int | None) -> int | float:
    """The ``global_step`` training stops at: ``max_steps`` rounded up to whole rollout batches counted from
    ``first_step`` (the step this run started at) once ``steps_per_batch`` is known; inf without a step limit."""
    if max_steps < 0:
        return math.inf
    if steps_per_batch is None or max_steps <= first_step:
        return max_steps
    return first_step + math.ceil((max_steps - first_step) / steps_per_batch) * steps_per_batch


def run_rate(done: float, elapsed: float | None) -> float | None:
    """Units per second over ``elapsed`` seconds, or None before any unit is done."""
    return done / elapsed if elapsed and done > 0 else None


def format_rate(rate: float | None) -> str:
    """A rate as tqdm writes it: ``2.50it/s``, or ``4.00s/it`` below one a second; ``?it/s`` unknown."""
    if rate is None:
        return "?it/s"
    return f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.2f}s/it"


class _RolloutCounting:
    """What both bars share: the total, where the run started, and the time and optimizer steps of a rollout
    batch (observed through the hooks and ``trainer.global_step`` only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._first_step = 0  # trainer.global_step when the bar (re)started: a resumed run's checkpoint step
        self._steps_per_batch: int | None = None
        self._batch_start: tuple[float, int] | None = None
        self._seconds: float | None = None
        self._batches = 0  # rollout batches trained since the bar started

    def _start_run(self, trainer: pl.Trainer) -> None:
        self._first_step, self._batches, self._batch_start = trainer.global_step, 0, None

    @property
    def total_train_batches(self) -> int | float:
        """The bar's total: the optimizer step training stops at (inf without ``trainer.max_steps``)."""
        max_steps = self.trainer.max_steps
        return final_step(self._first_step, -1 if max_steps is None else max_steps, self._steps_per_batch)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_batch_start(trainer, *args)
        self._batch_start = (time.perf_counter(), trainer.global_step)

    def _end_batch(self, trainer: pl.Trainer) -> None:
        """Record the rollout batch just trained: its seconds and its optimizer steps."""
        self._batches += 1
        if self._batch_start is None:
            return
        started, step = self._batch_start
        self._seconds = time.perf_counter() - started
        if trainer.global_step > step:
            self._steps_per_batch = trainer.global_step - step

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The module's progress-bar metrics (``reward``, ``val_acc``) and ``s/rollout``, without ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if self._seconds is not None:
            items["s/rollout"] = f"{self._seconds:.2f}"
        return items


class StepTQDMProgressBar(_RolloutCounting, TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps (see the module docstring)."""

    # Lightning's format with tqdm's rate_fmt: seconds per step ("5.00s/it") once a step takes over a second
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def _begin(self, trainer: pl.Trainer) -> None:
        """Put the bar at ``trainer.global_step`` of its total, counting this run's progress from there."""
        self._start_run(trainer)
        bar = self.train_progress_bar
        bar.total = convert_inf(self.total_train_batches)
        bar.set_description(DESCRIPTION, refresh=False)
        # tqdm's rate is (n - initial) / elapsed: a resumed run's first step is no progress made in this run
        bar.initial = bar.n = trainer.global_step
        bar.refresh()

    @override
    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._begin(trainer)  # a resumed run restarts mid-epoch: Lightning calls no on_train_epoch_start

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._begin(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._end_batch(trainer)
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        total = self.total_train_batches
        bar.total = convert_inf(total)
        if self._batches % self.refresh_rate == 0 or trainer.global_step >= total:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


if _RICH_AVAILABLE:
    from lightning.pytorch.callbacks.progress.rich_progress import CustomTimeColumn, ProcessingSpeedColumn
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    def _task_rate(task: Task) -> float | None:
        """The task's average rate since it started, counted from its ``first`` field (0 when absent)."""
        elapsed = task.finished_time if task.finished else task.elapsed
        return run_rate(task.completed - task.fields.get("first", 0), elapsed)

    class RunTimeColumn(ProgressColumn):
        """``elapsed • remaining``, the remaining time at the average rate since the task started."""

        max_refresh = 0.5

        def __init__(self, style: Any) -> None:
            self.style = style
            super().__init__()

        def render(self, task: Task) -> Text:
            elapsed = task.finished_time if task.finished else task.elapsed
            rate, total = _task_rate(task), task.total
            remaining = None
            if task.finished:
                remaining = 0.0
            elif rate is not None and total is not None and math.isfinite(total):
                remaining = (total - task.completed) / rate
            shown = ["-:--:--" if t is None else str(timedelta(seconds=int(t))) for t in (elapsed, remaining)]
            return Text(" • ".join(shown), style=self.style)

    class RunSpeedColumn(ProgressColumn):
        """The average rate since the task started, as tqdm writes it (``it/s``, or ``s/it`` below one)."""

        def __init__(self, style: Any) -> None:
            self.style = style
            super().__init__()

        def render(self, task: Task) -> Text:
            return Text(format_rate(_task_rate(task)), style=self.style)


LOGGERS = ("lightning.pytorch", "lightning.fabric", "gspo_lightning")
"""The loggers whose terminal handlers write through rich's console while its bar is on screen."""


class StepRichProgressBar(_RolloutCounting, RichProgressBar):
    """Lightning's rich bar, counting optimizer steps (see the module docstring).

    While the bar is on screen, rich sends what is printed to ``sys.stdout`` / ``sys.stderr`` above it, but
    Lightning's log handler keeps the stream it was created with and wrote past rich's back: ```Trainer.fit`
    stopped```, the held-out table and the export path came out glued to the bar's last line. The handlers of
    :data:`LOGGERS` that write to the terminal are pointed at rich's streams while the bar shows, and back after.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    @override
    def _init_progress(self, trainer: pl.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None and not self._rerouted:
            terminal = {id(sys.__stdout__): sys.stdout, id(sys.__stderr__): sys.stderr}
            for name in LOGGERS:  # over a few loggers' handlers
                for handler in logging.getLogger(name).handlers:
                    target = terminal.get(id(getattr(handler, "stream", None)))
                    if type(handler) is logging.StreamHandler and target is not None and target is not handler.stream:
                        self._rerouted.append((handler, handler.setStream(target)))

    @override
    def _stop_progress(self) -> None:
        super()._stop_progress()
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        return DESCRIPTION

    @override
    def configure_columns(self, trainer: pl.Trainer) -> list:
        """Lightning's columns, with the time and speed at the run's average rate."""
        swap = {
            CustomTimeColumn: RunTimeColumn(self.theme.time),
            ProcessingSpeedColumn: RunSpeedColumn(self.theme.processing_speed),
        }
        return [swap.get(type(column), column) for column in super().configure_columns(trainer)]

    def _show_step(self, trainer: pl.Trainer) -> None:
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id,
                completed=trainer.global_step,
                total=self.total_train_batches,
                first=self._first_step,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # a resumed run restarts mid-epoch: Lightning calls no on_train_epoch_start, so the bar starts here
        self._start_run(trainer)
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._show_step(trainer)
        self.refresh()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_run(trainer)
        super().on_train_epoch_start(trainer, pl_module)
        self._show_step(trainer)
        self.refresh()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._end_batch(trainer)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # as Lightning's, should the bar not have started
        self._show_step(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()


class StepLineProgress(_RolloutCounting, ProgressBar):
    """Plain progress lines for output that is not a terminal (see the module docstring).

    Args:
        every_s: seconds between two lines while training (the first rollout batch, each held-out evaluation and
            the last step always print one).
    """

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._run_start = self._last_line = 0.0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled:
            print(text, flush=True)
            self._last_line = time.monotonic()

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        """``step 120/3200 (3.8%) | reward 0.41 | s/rollout 1.35 | elapsed 0:02:40 | ETA 0:57:12``."""
        step, total = trainer.global_step, self.total_train_batches
        elapsed = time.monotonic() - self._run_start
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.1f}%)" if math.isfinite(total) else "")]
        parts += [
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in self.get_metrics(trainer, pl_module).items()
        ]
        parts.append(f"elapsed {timedelta(seconds=round(elapsed))}")
        rate = run_rate(step - self._first_step, elapsed)
        if rate is not None and math.isfinite(total):
            parts.append(f"ETA {timedelta(seconds=round(max(total - step, 0) / rate))}")
        return " | ".join(parts)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_run(trainer)
        self._run_start = time.monotonic()
        self._print(
            f"training: {DESCRIPTION} {trainer.global_step} -> {trainer.max_steps} (progress every {self.every_s:g} s)"
        )

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._end_batch(trainer)
        due = time.monotonic() - self._last_line >= self.every_s
        if self._batches == 1 or due or trainer.global_step >= self.total_train_batches:
            self._print(self.line(trainer, pl_module))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit" and self._batches:
            self._print(f"held-out evaluation | {self.line(trainer, pl_module)}")


def interactive() -> bool:
    """Whether standard output is a terminal a progress bar can redraw on."""
    return sys.stdout.isatty()


def use_step_progress_bar(trainer: pl.Trainer) -> None:
    """Replace Lightning's own rich or tqdm bar (the default, or one listed in ``trainer.callbacks``) with the
    step-counting one of the same kind and settings, or with plain lines when standard output is no terminal; any
    other bar (a subclass, your own), or none, is left alone."""
    bar = trainer.progress_bar_callback
    if type(bar) in (RichProgressBar, TQDMProgressBar) and not interactive():
        new: Any = StepLineProgress()
    elif type(bar) is RichProgressBar:
        new = StepRichProgressBar(bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs)
    elif type(bar) is TQDMProgressBar:
        new = StepTQDMProgressBar(bar.refresh_rate, bar.process_position, leave=bar._leave)
    else:
        return
    trainer.callbacks[trainer.callbacks.index(bar)] = new
