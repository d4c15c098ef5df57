"""The progress bar: total and position in optimizer steps, rounded to whole rollout batches, resumed where the
checkpoint stopped, with an ETA and a rate at the run's average and the seconds per rollout batch."""

import copy
import math
from typing import ClassVar

import lightning.pytorch as pl
import pytest
from rich.progress import Progress
from rich.text import Text
from support import tiny_args
from tqdm import tqdm

from gspo_lightning.callbacks.progress import (
    RunSpeedColumn,
    RunTimeColumn,
    StepRichProgressBar,
    StepTQDMProgressBar,
    final_step,
    format_rate,
)
from gspo_lightning.cli import cli_main


@pytest.fixture(autouse=True)
def _a_terminal(monkeypatch):
    """These tests are about the bars a terminal gets (pytest's captured output is none)."""
    monkeypatch.setattr("gspo_lightning.callbacks.progress.interactive", lambda: True)


def test_final_step_rounds_up_to_whole_rollout_batches_from_where_the_run_started():
    assert final_step(0, 5, None) == 5  # before the first rollout batch: max_steps as given
    assert final_step(0, 5, 2) == 6 and final_step(0, 6, 2) == 6
    assert final_step(4, 9, 4) == 12  # resumed at step 4 with 4 steps a batch: 8 would stop short of 9
    assert final_step(8, 6, 2) == 6  # a checkpoint past max_steps: nothing left to train
    assert final_step(0, -1, 2) == math.inf


def test_format_rate_reads_like_tqdm():
    assert format_rate(None) == "?it/s" and format_rate(2.5) == "2.50it/s" and format_rate(0.25) == "4.00s/it"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _row(progress: Progress, task_id) -> tuple[str, str]:
    task = progress.tasks[task_id]
    return str(RunTimeColumn("").render(task)), str(RunSpeedColumn("").render(task))


def test_rich_columns_estimate_from_the_run_average_even_with_slow_rollout_batches():
    # rich's own estimate keeps 30 s of updates: with a rollout batch a minute it never has two, and shows no ETA
    clock = Clock()
    progress = Progress(get_time=clock)
    task = progress.add_task("optimizer steps", total=20)
    progress.update(task, completed=4, first=4)  # resumed at step 4: no progress made in this run
    assert _row(progress, task) == ("0:00:00 • -:--:--", "?it/s")
    for _ in range(2):  # two rollout batches of 4 optimizer steps, 60 s each
        clock.now += 60
        progress.update(task, advance=4)
    assert progress.tasks[task].time_remaining is None  # what Lightning's columns show: rich's estimate
    assert _row(progress, task) == ("0:02:00 • 0:02:00", "15.00s/it")  # 8 steps in 120 s, 8 to go
    clock.now += 60
    progress.update(task, advance=8)
    assert _row(progress, task)[0] == "0:03:00 • 0:00:00"


class RecordBar(pl.Callback):
    """The training bar before every rollout batch and at the end: position, total, where this run's rate
    counts from, and the bar's text as if 10 s had passed since it started (from its own columns or format)."""

    seen: ClassVar[list[dict]] = []

    def _record(self, trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, StepRichProgressBar):
            task = copy.copy(next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id))
            task.start_time = task._get_time() - 10
            texts = (column.render(task) for column in bar.progress.columns)
            line = " ".join(text.plain for text in texts if isinstance(text, Text))
            at, first = (task.completed, task.total), task.fields["first"]
        else:
            tq = bar.train_progress_bar
            line = tqdm.format_meter(**{**tq.format_dict, "elapsed": 10})
            at, first = (tq.n, tq.total), tq.initial
        RecordBar.seen.append({"at": at, "first": first, "line": line})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer)


def _fit(root, kind: str, max_steps: int, *extra: str):
    RecordBar.seen.clear()
    args = ["--trainer.enable_progress_bar", "true", "--trainer.callbacks+=test_progress_bar.RecordBar", *extra]
    if kind == "tqdm":
        args += ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = cli_main(["fit", *tiny_args(root, *args, max_steps=max_steps)])
    assert type(cli.trainer.progress_bar_callback) is (StepRichProgressBar if kind == "rich" else StepTQDMProgressBar)
    return list(RecordBar.seen)


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_the_bar_rounds_to_whole_rollout_batches_and_a_resumed_run_starts_at_its_checkpoint(tmp_path, kind):
    # 2 optimizer steps per rollout batch; max_steps=3 trains 2 rollout batches, to step 4
    mid = [
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2",
        "--trainer.callbacks.save_top_k=-1",
    ]
    fresh = _fit(tmp_path, kind, 3, *mid, f"--trainer.callbacks.dirpath={tmp_path / 'mid'}")
    assert [s["at"] for s in fresh] == [(0, 3), (2, 4), (4, 4)]
    assert all("optimizer steps" in s["line"] for s in fresh)
    assert "s/rollout" not in fresh[0]["line"]  # nothing trained yet
    # the held-out evaluation after the 2nd rollout batch (val_check_interval=2) shows its accuracy
    assert all(name in fresh[-1]["line"] for name in ("reward", "val_acc", "s/rollout"))

    # resumed from the checkpoint after the 1st rollout batch: mid-epoch, as a run stopped while training
    checkpoint = next((tmp_path / "mid").glob("*step=2.ckpt"))
    resumed = _fit(tmp_path, kind, 6, "--ckpt_path", str(checkpoint))
    assert [s["at"] for s in resumed] == [(2, 6), (4, 6), (6, 6)]
    assert {s["first"] for s in resumed} == {2}
    # 2 steps made in 10 s, 2 to go: 10 s left at 5 s a step (the 2 resumed steps were not made in those 10 s)
    eta = "0:00:10 • 0:00:10" if kind == "rich" else "00:10<00:10"
    assert eta in resumed[1]["line"] and "5.00s/it" in resumed[1]["line"], resumed[1]["line"]
