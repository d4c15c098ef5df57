"""Monitoring callbacks observe through ``outputs`` alone: given a module with no attributes, they still work."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from support import make_batch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gspo_lightning.callbacks import MoEMonitor, SampleLogger
from gspo_lightning.moe import RouterStats


class LogOnly:
    """A LightningModule stand-in with nothing but Lightning's public ``log_dict``."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_dict(self, metrics, **kwargs) -> None:
        self.logged.update(metrics)


def _trainer(loggers=(), rank_zero=True):
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=7))
    return SimpleNamespace(is_global_zero=rank_zero, loggers=list(loggers), fit_loop=loop, global_step=28)


def test_moe_monitor_logs_router_stats_from_outputs():
    # 2 layers, 4 experts, top-2; 3 real tokens in one sequence of 4 positions (the last is padding)
    stats = RouterStats(top_k=2)
    logits = torch.tensor([[4.0, 3.0, 0.0, 0.0], [4.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 9.0, 9.0]])
    stats.add((logits, logits.flip(-1)), torch.tensor([[True, True, True, False]]))
    module = LogOnly()
    MoEMonitor(histograms=False).on_train_batch_end(_trainer(), module, {"router_stats": stats.result()}, None, 0)
    # layer 0 routes expert 0 three times, expert 1 twice, expert 2 once: load (3, 2, 1, 0) / 6, max 0.5 -> 2.0
    assert module.logged["moe/layer_0/load_max"] == pytest.approx(0.5)
    assert module.logged["moe/layer_0/load_min"] == 0.0
    assert module.logged["moe/layer_0/load_imbalance"] == pytest.approx(2.0)
    assert module.logged["moe/load_imbalance"] == pytest.approx(2.0)  # layer 1 is the mirror image


def test_moe_monitor_warns_once_without_router_stats():
    monitor, module = MoEMonitor(), LogOnly()
    with pytest.warns(UserWarning, match="not a mixture of experts"):
        monitor.on_train_batch_end(_trainer(), module, {"router_stats": None}, None, 0)
    monitor.on_train_batch_end(_trainer(), module, {"router_stats": None}, None, 1)
    assert not module.logged


def test_sample_logger_writes_the_batch_from_outputs(tmp_path):
    batch = make_batch([1.0, 0.0], group_size=2)
    batch.prompts, batch.completions = ["1+1=", "1+1="], ["2", "3|x"]
    logger = TensorBoardLogger(tmp_path, name="", version="")
    SampleLogger(every_n_steps=1).on_train_batch_end(_trainer([logger]), object(), {"batch": batch}, None, 0)
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    text = acc.Tensors("samples/completions/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| 1 | 0 | 1+1= | 3\\|x | 0.000 |" in text and acc.Tensors("samples/completions/text_summary")[0].step == 7
