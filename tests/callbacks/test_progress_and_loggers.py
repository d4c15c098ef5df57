"""The progress bar counts optimizer steps on both ends; CSV and TensorBoard loggers get the same metrics;
SampleLogger writes a file where the logger takes no text."""

import csv
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
from support import scalars, tiny_args

from gspo_lightning.callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from gspo_lightning.cli import cli_main


@pytest.fixture(autouse=True)
def _a_terminal(monkeypatch):
    """These tests are about the bars a terminal gets (pytest's captured output is none)."""
    monkeypatch.setattr("gspo_lightning.callbacks.progress.interactive", lambda: True)


class RecordBar(pl.Callback):
    """(position, total) of the training bar before every rollout batch and at the end, read from the bar."""

    seen: ClassVar[list[tuple[float, float]]] = []

    def _record(self, trainer) -> None:
        bar = trainer.progress_bar_callback
        if isinstance(bar, StepRichProgressBar):
            task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
            RecordBar.seen.append((task.completed, task.total))
        else:
            RecordBar.seen.append((bar.train_progress_bar.n, bar.train_progress_bar.total))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer)


@pytest.mark.parametrize("kind", ["rich", "tqdm"])
def test_the_bar_counts_optimizer_steps_per_rollout_batch(tmp_path, kind):
    RecordBar.seen.clear()
    extra = ["--trainer.enable_progress_bar", "true", "--trainer.callbacks+=test_progress_and_loggers.RecordBar"]
    if kind == "tqdm":
        extra += ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = cli_main(["fit", *tiny_args(tmp_path, *extra, max_steps=4)])
    expected = StepRichProgressBar if kind == "rich" else StepTQDMProgressBar
    assert type(cli.trainer.progress_bar_callback) is expected
    # 2 mini-batches per rollout batch: 2 optimizer steps a batch, out of max_steps = 4
    assert RecordBar.seen == [(0, 4), (2, 4), (4, 4)]
    assert "s/rollout" in cli.trainer.progress_bar_callback.get_metrics(cli.trainer, cli.model)


def test_no_progress_bar_stays_none(tmp_path):
    cli = cli_main(["fit", *tiny_args(tmp_path, max_steps=2)])  # tiny_args turns the bar off
    assert cli.trainer.progress_bar_callback is None


def _csv_metrics(log_dir: Path) -> set[str]:
    with (log_dir / "metrics.csv").open() as f:
        return set(next(csv.reader(f))) - {"epoch", "step"}


def test_csv_and_tensorboard_loggers_get_the_same_metric_names(tmp_path):
    csv_logger = [
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "csv"),
    ]
    cli_main(["fit", *tiny_args(tmp_path / "csv", *csv_logger, max_steps=4)])
    cli_main(["fit", *tiny_args(tmp_path / "tb", max_steps=4)])
    from_csv = _csv_metrics(tmp_path / "csv" / "lightning_logs" / "version_0")
    # Lightning's own extra "epoch" (a CSV column); no TensorBoard placeholder "hp_metric" (-1 on every run)
    tb = set(scalars(tmp_path / "tb" / "lightning_logs" / "version_0"))
    assert "hp_metric" not in tb
    from_tb = tb - {"epoch"}
    assert from_csv == from_tb and "rollout/reward_mean" in from_csv and "moe/layer_0/load_imbalance" in from_csv
    # SampleLogger (in the demo config) had no text logger there: the tables went to a file
    samples = tmp_path / "csv" / "lightning_logs" / "version_0" / "samples.md"
    assert "| # | group | prompt | completion | reward |" in samples.read_text()


def test_sample_logger_without_any_logger_writes_its_file(tmp_path):
    cli_main(["fit", *tiny_args(tmp_path, "--trainer.logger", "false", max_steps=2)])
    assert "completion" in (tmp_path / "samples.md").read_text()


def test_the_epoch_column_counts_passes_over_the_training_prompts(tmp_path):
    # Lightning fills "epoch" with its loop epoch, always 0 in a run of rollout batches; here it is the passes over
    # this rank's 64 training prompts: 4 prompts a rollout batch -> 1/16, 2/16 after two batches, the held-out
    # evaluation after the second batch at 2/16 too (it logged 0 there before)
    cli_main(["fit", *tiny_args(tmp_path, max_steps=4)])
    events = scalars(tmp_path / "lightning_logs" / "version_0")["epoch"]
    values = [e.value for e in sorted(events, key=lambda e: (e.step, e.wall_time))]
    assert set(values) <= {0.0, 1 / 16, 2 / 16} and 1 / 16 in values and values[-1] == 2 / 16, values
    assert values == sorted(values)
