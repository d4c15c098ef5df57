"""`MoEMonitor`: per-layer expert load, load imbalance and router entropy of an MoE policy (``moe/*``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from gspo_lightning.callbacks._steps import logger_step
from gspo_lightning.moe.stats import RouterStatsResult


class MoEMonitor(Callback):
    """Logs router statistics over every micro-batch of each rollout batch.

    Reads ``outputs["router_stats"]`` (a :class:`~gspo_lightning.moe.stats.RouterStatsResult`), which
    ``GSPOModule.training_step`` returns for an MoE policy. Scalars: ``moe/load_imbalance`` and
    ``moe/router_entropy`` (means over layers), and per layer ``moe/layer_<i>/load_imbalance``,
    ``moe/layer_<i>/router_entropy``, ``moe/layer_<i>/load_max``, ``moe/layer_<i>/load_min`` and, when the
    engine reports its routes (Rollout Routing Replay), ``moe/layer_<i>/rollout_routing_mismatch_frac``; with a
    TensorBoard logger also each layer's expert load as a histogram. ``moe/aux_loss`` is logged by the
    module when ``router_aux_loss_coef > 0``. On a dense model the callback warns once and does nothing.

    Args:
        per_layer: also log the per-layer scalars.
        histograms: log each layer's expert load as a TensorBoard histogram.
    """

    def __init__(self, per_layer: bool = True, histograms: bool = True) -> None:
        self.per_layer = per_layer
        self.histograms = histograms
        self._warned = False

    def metrics(self, stats: RouterStatsResult) -> dict[str, float]:
        out = {
            "moe/load_imbalance": float(stats.load_imbalance.mean()),
            "moe/router_entropy": float(stats.router_entropy.mean()),
        }
        if self.per_layer:
            for i, load in enumerate(stats.load):
                out[f"moe/layer_{i}/load_imbalance"] = float(stats.load_imbalance[i])
                out[f"moe/layer_{i}/router_entropy"] = float(stats.router_entropy[i])
                out[f"moe/layer_{i}/load_max"] = float(load.max())
                out[f"moe/layer_{i}/load_min"] = float(load.min())
                if stats.rollout_mismatch is not None:
                    out[f"moe/layer_{i}/rollout_routing_mismatch_frac"] = float(stats.rollout_mismatch[i])
        return out

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = outputs.get("router_stats") if isinstance(outputs, dict) else None
        if stats is None:
            if not self._warned:
                rank_zero_warn("MoEMonitor: the policy reports no router statistics (not a mixture of experts).")
                self._warned = True
            return
        pl_module.log_dict(self.metrics(stats), on_step=True, on_epoch=False, batch_size=1)
        if not (self.histograms and trainer.is_global_zero):
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, layer in enumerate(stats.load):
                    logger.experiment.add_histogram(
                        f"moe/layer_{i}/expert_load", layer, global_step=logger_step(trainer)
                    )
