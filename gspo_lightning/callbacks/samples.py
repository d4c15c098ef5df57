"""`SampleLogger`: sample completions with their rewards as TensorBoard text (a markdown file without one)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from gspo_lightning.callbacks._steps import logger_step


class SampleLogger(Callback):
    """Writes a markdown table of prompts, completions and rewards to TensorBoard every few steps; with no
    TensorBoard logger (CSV, or none) it appends the tables to ``samples.md`` in the run's folder instead.

    Reads the rollout batch the module's ``training_step`` returns as ``outputs["batch"]``. The reward
    column shows the scored rewards (before any KL penalty in the reward).

    Args:
        every_n_steps: rollout batches between two tables.
        num_samples: rows per table (the first samples of the batch, whole groups first).
        max_chars: completions are cut to this many characters.
    """

    def __init__(self, every_n_steps: int = 10, num_samples: int = 8, max_chars: int = 500) -> None:
        if every_n_steps < 1 or num_samples < 1 or max_chars < 1:
            raise ValueError("every_n_steps, num_samples and max_chars must all be >= 1.")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.max_chars = max_chars
        self._calls = 0
        self._file: Path | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._file = None
        if not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            # loggers that take no text (CSV, none): the tables go to a markdown file in the run's folder
            self._file = Path(trainer.log_dir or trainer.default_root_dir) / "samples.md"
            rank_zero_info(f"SampleLogger: no TensorBoard logger for text; writing the samples to {self._file}")

    @staticmethod
    def _cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    def table(self, batch) -> str:
        lines = ["| # | group | prompt | completion | reward |", "|---|---|---|---|---|"]
        for i in range(min(self.num_samples, len(batch))):
            completion = batch.completions[i][: self.max_chars]
            lines.append(
                f"| {i} | {int(batch.group_ids[i])} | {self._cell(batch.prompts[i])} | {self._cell(completion)}"
                f" | {float(batch.rewards[i]):.3f} |"
            )
        return "\n".join(lines)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._calls += 1
        if (self._calls - 1) % self.every_n_steps or not trainer.is_global_zero:
            return
        text = self.table(outputs["batch"])
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            with self._file.open("a", encoding="utf-8") as out:
                out.write(f"## step {logger_step(trainer)}\n\n{text}\n\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples/completions", text, global_step=logger_step(trainer))
