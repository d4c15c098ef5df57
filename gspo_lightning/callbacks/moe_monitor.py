"""`MoEMonitor`: per-layer expert load, load imbalance and router entropy of an MoE policy (``moe/*``)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from gspo_lightning.callbacks._steps import logger_step


class MoEMonitor(Callback):
    """Logs router statistics of the last micro-batch of each rollout batch.

    Scalars: ``moe/load_imbalance`` and ``moe/router_entropy`` (means over layers), and per layer
    ``moe/layer_<i>/load_imbalance``, ``moe/layer_<i>/router_entropy``, ``moe/layer_<i>/load_max``,
    ``moe/layer_<i>/load_min``; with a TensorBoard logger also each layer's expert load as a histogram.
    ``moe/aux_loss`` is logged by the module when ``router_aux_loss_coef > 0``. On a dense model the
    callback warns once and does nothing.

    Args:
        per_layer: also log the per-layer scalars.
        histograms: log each layer's expert load as a TensorBoard histogram.
    """

    def __init__(self, per_layer: bool = True, histograms: bool = True) -> None:
        self.per_layer = per_layer
        self.histograms = histograms

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "moe", None) is None:
            rank_zero_warn("MoEMonitor: the policy is not a mixture-of-experts model; nothing to monitor.")
            return
        pl_module.collect_router_stats = True

    def metrics(self, stats: dict) -> dict[str, float]:
        imbalance, entropy, load = stats["moe/load_imbalance"], stats["moe/router_entropy"], stats["moe/load"]
        out = {"moe/load_imbalance": float(imbalance.mean()), "moe/router_entropy": float(entropy.mean())}
        if self.per_layer:
            for i in range(load.shape[0]):
                out[f"moe/layer_{i}/load_imbalance"] = float(imbalance[i])
                out[f"moe/layer_{i}/router_entropy"] = float(entropy[i])
                out[f"moe/layer_{i}/load_max"] = float(load[i].max())
                out[f"moe/layer_{i}/load_min"] = float(load[i].min())
        return out

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = getattr(pl_module, "moe_stats", None)
        if not stats:
            return
        batch_size = len(pl_module.last_batch) if pl_module.last_batch is not None else 1
        pl_module.log_dict(self.metrics(stats), on_step=True, on_epoch=False, batch_size=batch_size)
        if not (self.histograms and trainer.is_global_zero):
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for i, layer in enumerate(stats["moe/load"]):
                    logger.experiment.add_histogram(
                        f"moe/layer_{i}/expert_load", layer, global_step=logger_step(trainer)
                    )
