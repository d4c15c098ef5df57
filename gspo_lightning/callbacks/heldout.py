"""`HeldOutReport`: held-out accuracy before and after training, printed and saved at the end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from gspo_lightning.callbacks._steps import logger_step
from gspo_lightning.rollout.evaluation import heldout_accuracy


class HeldOutReport(Callback):
    """Evaluates every held-out prompt (greedy and sampled) when training starts and ends.

    It evaluates through the data module (``evaluate_heldout``), the same evaluation the validation loop
    runs, with whatever policy the data module's engine generates with.

    Logs ``val/accuracy`` and ``val/accuracy_sampled`` at the start step too, prints a before/after
    table at the end, and writes it as ``heldout_report.json`` in the logger's folder.

    The "before" figures are saved in checkpoints: a resumed run keeps the baseline of the run's start
    instead of re-evaluating the partly trained policy.
    """

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self.after: dict[str, float] = {}
        self._restored = False  # `before` came from a checkpoint: the next training start keeps it

    @staticmethod
    def _evaluate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        dm = trainer.datamodule
        if not dm.val_prompts and trainer.world_size == 1:
            raise RuntimeError("HeldOutReport needs held-out prompts, but the prompt source has no validation split.")
        # every rank sums its share: a collective, so each rank evaluates (possibly nothing) and reduces
        return heldout_accuracy(
            dm.evaluate_heldout(), lambda t: trainer.strategy.reduce(t.to(pl_module.device), reduce_op="sum")
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        restored, self._restored = self._restored, False
        if restored:
            rank_zero_info(self._line("held-out accuracy before (from the checkpoint)", self.before))
            return
        self.before = self._evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.before.items() if k != "n"}, step=logger_step(trainer))
        rank_zero_info(self._line("held-out accuracy before", self.before))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.after = self._evaluate(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics({k: v for k, v in self.after.items() if k != "n"}, step=logger_step(trainer))
        report = {"before": self.before, "after": self.after, "optimizer_steps": trainer.global_step}
        rank_zero_info(self.table())
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must make it
        if trainer.is_global_zero and log_dir is not None:
            path = Path(log_dir) / "heldout_report.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2))

    @staticmethod
    def _line(title: str, m: dict[str, float]) -> str:
        return f"{title}: greedy {100 * m['val/accuracy']:.1f}%, sampled {100 * m['val/accuracy_sampled']:.1f}%"

    def table(self) -> str:
        rows = [("greedy", "val/accuracy"), ("sampled", "val/accuracy_sampled")]
        lines = [
            f"Held-out accuracy on {int(self.after.get('n', 0))} prompts",
            f"{'':10}{'before':>9}{'after':>9}{'gain':>9}",
        ]
        for label, key in rows:
            b, a = 100 * self.before.get(key, float("nan")), 100 * self.after.get(key, float("nan"))
            lines.append(f"{label:10}{b:8.1f}%{a:8.1f}%{a - b:+8.1f}")
        return "\n".join(lines)

    @override
    def state_dict(self) -> dict:
        return {"before": self.before}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.before = state_dict.get("before", {})
        self._restored = bool(self.before)
