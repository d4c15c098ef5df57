"""The monitoring callbacks with loggers that take no text or histograms (CSV) and with no logger at all: no
crash, and what TensorBoard would have shown goes to a file or is skipped."""

import csv
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from support import make_batch

from gspo_lightning.callbacks import HeldOutReport, MoEMonitor, SampleLogger, samples
from gspo_lightning.moe import RouterStats
from gspo_lightning.rollout import EvalResult


def _trainer(tmp_path, loggers):
    """A Trainer stand-in: its loggers, and the folder Lightning's ``log_dir`` gives (the root without one)."""
    log_dir = loggers[0].log_dir if loggers else str(tmp_path)
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=3))
    root = str(tmp_path)
    return SimpleNamespace(
        loggers=loggers, log_dir=log_dir, default_root_dir=root, is_global_zero=True, fit_loop=loop, global_step=6
    )


@pytest.mark.parametrize("with_csv", [True, False], ids=["csv", "no-logger"])
def test_sample_logger_writes_its_tables_to_a_file_and_says_so_once(tmp_path, monkeypatch, with_csv):
    said: list[str] = []
    monkeypatch.setattr(samples, "rank_zero_info", said.append)
    trainer = _trainer(tmp_path, [CSVLogger(tmp_path)] if with_csv else [])
    batch = make_batch([1.0, 0.0], group_size=2)
    batch.prompts, batch.completions = ["1+1=", "1+1="], ["2", "3|x"]
    logger = SampleLogger(every_n_steps=2)
    logger.on_train_start(trainer, None)
    for i in range(3):  # tables at the 1st and 3rd rollout batch
        logger.on_train_batch_end(trainer, None, {"batch": batch}, None, i)
    assert len(said) == 1 and "samples.md" in said[0]
    folder = tmp_path / "lightning_logs" / "version_0" if with_csv else tmp_path
    text = (folder / "samples.md").read_text()
    assert text.count("## step 3") == 2 and "| 1 | 0 | 1+1= | 3\\|x | 0.000 |" in text


def test_moe_monitor_logs_scalars_and_skips_histograms_without_tensorboard(tmp_path):
    stats = RouterStats(top_k=1)
    stats.add((torch.tensor([[2.0, 0.0], [0.0, 2.0]]),), torch.tensor([[True, True]]))
    logged = {}
    module = SimpleNamespace(log_dict=lambda metrics, **kwargs: logged.update(metrics))
    trainer = _trainer(tmp_path, [CSVLogger(tmp_path)])
    MoEMonitor(histograms=True).on_train_batch_end(trainer, module, {"router_stats": stats.result()}, None, 0)
    assert logged["moe/layer_0/load_imbalance"] == pytest.approx(1.0)


@pytest.mark.parametrize("with_csv", [True, False], ids=["csv", "no-logger"])
def test_heldout_report_logs_and_writes_its_report_with_any_logger(tmp_path, with_csv):
    loggers = [CSVLogger(tmp_path)] if with_csv else []
    result = EvalResult(torch.tensor([True, False]), torch.tensor([[True, True], [False, True]]))
    datamodule = SimpleNamespace(val_prompts=[0, 1], evaluate_heldout=lambda: iter([result]))
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)
    trainer = _trainer(tmp_path, loggers)
    trainer.__dict__.update(datamodule=datamodule, strategy=strategy, world_size=1)
    report, module = HeldOutReport(), SimpleNamespace(device=torch.device("cpu"))
    report.on_train_start(trainer, module)
    report.on_train_end(trainer, module)
    folder = tmp_path / "lightning_logs" / "version_0" if with_csv else tmp_path
    written = json.loads((folder / "heldout_report.json").read_text())
    assert written["after"]["val/accuracy"] == 0.5 and written["after"]["val/accuracy_sampled"] == 0.75
    if with_csv:
        loggers[0].save()
        with (folder / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [float(r["val/accuracy"]) for r in rows] == [0.5, 0.5]
