"""The strategy adapter's own checks (strategies that need a GPU are built, not run)."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from support import scalars, tiny_args

from gspo_lightning.cli import cli_main
from gspo_lightning.training.strategy import StrategyAdapter


def _adapter(strategy):
    return StrategyAdapter(SimpleNamespace(strategy=strategy))


def test_deepspeed_clipping_must_agree_with_max_grad_norm():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install -e '.[dev]' brings it")
    adapter = _adapter(DeepSpeedStrategy(config={"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5}))
    with pytest.raises(ValueError, match=r"gradient_clipping=0.5, but model.update.max_grad_norm=1.0"):
        adapter.check_clipping(1.0)
    adapter.check_clipping(0.5)
    _adapter(DeepSpeedStrategy(config={"zero_optimization": {"stage": 2}})).check_clipping(None)


def test_other_strategies_clip_with_max_grad_norm():
    _adapter(DDPStrategy()).check_clipping(1.0)


def _grad_norms(root, *extra):
    odd_digits = '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]'  # non-zero advantages
    cli = cli_main(
        ["fit", *tiny_args(root, "--data.rewards", odd_digits, "--model.update.max_grad_norm", "0.01", *extra)]
    )
    return [e.value for e in scalars(root / "lightning_logs" / "version_0")["policy/grad_norm"]], cli.model.policy


def test_clipping_sees_unscaled_gradients_under_loss_scaling(tmp_path):
    # 16-mixed scales the loss and unscales inside the optimizer step: clipping before the step (the old place)
    # clipped the scaled gradients, so training nearly stopped and the scaled norm was logged
    torch.manual_seed(0)
    plain, plain_policy = _grad_norms(tmp_path / "plain")
    torch.manual_seed(0)
    scaled, scaled_policy = _grad_norms(tmp_path / "scaled", "--trainer.plugins", "support.FakeScaler")
    assert plain and scaled == pytest.approx(plain, rel=1e-4)
    for a, b in zip(plain_policy.parameters(), scaled_policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _SyncRecorder(torch.nn.Module):
    """Stands in for an FSDP2-sharded policy: records ``set_requires_gradient_sync`` calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def set_requires_gradient_sync(self, value):
        self.calls.append(value)


def test_fsdp2_reduce_scatters_every_micro_batch_by_default():
    # skipping the reduce-scatter keeps every gradient unsharded until the last micro-batch: 114 GiB per GPU
    # for Qwen3-30B-A3B on 8 GPUs (gspo-lightning plan), so sharded strategies sync every micro-batch
    from lightning.pytorch.strategies import ModelParallelStrategy

    adapter, policy = _adapter(ModelParallelStrategy()), _SyncRecorder()
    with adapter.backward_sync(False, policy):
        pass
    assert policy.calls == []
    with adapter.backward_sync(False, policy, every=False):  # model.sharding.sync_every_micro_batch: false
        assert policy.calls == [False]
    assert policy.calls == [False, True]


def test_ddp_skips_the_all_reduce_until_the_last_micro_batch():
    blocked = []
    strategy = SimpleNamespace(block_backward_sync=lambda: blocked.append(1) or contextlib.nullcontext())
    adapter = _adapter(strategy)
    with adapter.backward_sync(False, torch.nn.Linear(1, 1)):
        pass
    with adapter.backward_sync(True, torch.nn.Linear(1, 1)):
        pass
    assert blocked == [1]
    with adapter.backward_sync(False, torch.nn.Linear(1, 1), every=True):
        pass
    assert blocked == [1]


def test_gradients_are_freed_after_each_optimizer_step(tmp_path):
    # the next rollout batch generates while nothing holds the last update's gradients (gspo-lightning plan
    # counts them in the update only: 14 GiB per GPU for Qwen3-30B-A3B on 8 GPUs)
    odd_digits = '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]'  # non-zero advantages
    cli = cli_main([*tiny_args(tmp_path, "--data.rewards", odd_digits)], run=False)
    held = []

    class GradientsAfterUpdate(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            held.append(sum(p.grad is not None for p in pl_module.policy.parameters()))

    cli.trainer.callbacks.append(GradientsAfterUpdate())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert held == [0, 0]  # two rollout batches, each ending with no gradient held
