"""Asynchronous rollouts (``data.max_staleness: K``): the bound, the version stamps, equality with the synchronous
path at identical weights, exact resume with batches in flight, refusals, multi-turn."""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support import built_module, make_batch, scalars, tiny_args, tool_args

from gspo_lightning.cli import cli_main
from gspo_lightning.engines import TransformersEngine
from gspo_lightning.rollout import RolloutDataModule
from gspo_lightning.rollout.pipeline import RolloutPipeline


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


# -- the pipeline on its own: a slow fake engine and a slow fake trainer --------------------------------------
class FakeEngine:
    """Holds a version number as its "weights"; each batch records the version it was generated with."""

    def __init__(self, seed: int) -> None:
        self.weights: int | None = None
        self.rng = random.Random(seed)
        self.produced = 0
        self.lock = threading.Lock()

    def load(self, snapshot: int) -> None:
        self.weights = snapshot

    def produce(self, index: int):
        time.sleep(self.rng.uniform(0, 0.004))
        batch = make_batch([1.0, 0.0], 2)
        batch.metrics.update({"index": index, "generated_with": self.weights})
        with self.lock:
            self.produced = index + 1
        return batch

    def position(self) -> dict[str, int]:
        return {"epoch": 0, "cursor": self.produced}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_staleness_never_exceeds_k_and_each_batch_is_stamped_with_the_weights_that_made_it(k, seed):
    engine, trainer_rng = FakeEngine(seed), random.Random(1000 + seed)
    pipeline = RolloutPipeline(engine.produce, engine.load, engine.position, k, first=0)
    pipeline.start(0)
    try:
        for step in range(15):
            batch, _ = pipeline.take(step)
            version = int(batch.policy_version[0])
            assert (batch.policy_version == version).all()
            assert batch.metrics["index"] == step
            assert batch.metrics["generated_with"] == version, "generated with the version it is stamped with"
            assert version == max(0, step - k) and 0 <= step - version <= k
            with engine.lock:
                assert engine.produced <= step + k + 1, "the producer ran ahead of what version step allows"
            time.sleep(trainer_rng.uniform(0, 0.004))  # the update
            pipeline.publish(step + 1, step + 1)
    finally:
        pipeline.close()


def test_a_failing_generation_is_raised_in_the_trainer_not_hung_on():
    def produce(index):
        if index == 2:
            raise RuntimeError("engine fell over")
        return make_batch([1.0, 0.0], 2)

    pipeline = RolloutPipeline(produce, lambda s: None, lambda: {"epoch": 0, "cursor": 0}, 2, first=0)
    pipeline.start(0)
    pipeline.take(0)
    pipeline.take(1)
    pipeline.publish(1, 1)
    with pytest.raises(RuntimeError, match="engine fell over"):
        pipeline.take(2)
    pipeline.close()


def test_a_checkpoint_waits_for_the_batches_in_flight_and_names_both_positions():
    engine = FakeEngine(0)
    pipeline = RolloutPipeline(engine.produce, engine.load, engine.position, 2, first=0)
    pipeline.start(0)
    pipeline.take(0)
    pipeline.publish(1, 1)
    batches, positions = pipeline.pending(1)
    assert [b.metrics["index"] for b in batches] == [1, 2] and [int(b.policy_version[0]) for b in batches] == [0, 0]
    assert positions == [{"epoch": 0, "cursor": c} for c in (1, 2, 3)], "before each batch in flight, after the last"
    pipeline.close()


# -- the pre-update pass: a stale batch is not on-policy ----------------------------------------------------
def test_a_stale_batch_gets_the_trainers_pi_old_even_when_the_update_is_on_policy():
    module = built_module("builtin:tiny-qwen3-moe-random", mini_batches=1)
    batch = make_batch([1.0, 0.0, 0.0, 1.0], 2)
    assert module.pre_update(batch, module.policy).old_logprobs is None, "on-policy: pi_old's pass is skipped"
    batch.staleness = torch.tensor([0, 0, 1, 1])
    old = module.pre_update(batch, module.policy).old_logprobs
    assert old is not None and old.shape == batch.response_mask.shape


# -- through the CLI on the tiny model ------------------------------------------------------------------------
class RecordRollouts(Callback):
    batches: ClassVar[list[dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = outputs["batch"]
        RecordRollouts.batches.append(
            {
                "prompts": rollout.prompt_index.tolist(),
                "tokens": rollout.input_ids.tolist(),
                "logprobs": rollout.rollout_logprobs.tolist(),
                "rewards": rollout.rewards.tolist(),
                "staleness": None if rollout.staleness is None else rollout.staleness.tolist(),
                "thread": any(t.name == "gspo-rollouts" for t in threading.enumerate()),
            }
        )


def _run(root: Path, *extra: str, max_steps: int, args=tiny_args):
    RecordRollouts.batches.clear()
    cli = cli_main(["fit", *args(root, "--trainer.callbacks+=test_async_rollouts.RecordRollouts", *extra,
                                 max_steps=max_steps)])  # fmt: skip
    return list(RecordRollouts.batches), cli


FROZEN = ("--model.optimizer.init_args.lr", "0.0")  # every version holds the same weights


@pytest.fixture(scope="module")
def synchronous_frozen(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["gspo-lightning"])
        batches, _ = _run(tmp_path_factory.mktemp("sync"), *FROZEN, max_steps=8)
    return batches


@pytest.mark.parametrize("k", [1, 2])
def test_at_identical_weights_asynchronous_batches_equal_the_synchronous_ones(k, synchronous_frozen, tmp_path):
    """With every version's weights equal (lr 0), the pipeline must give back exactly the synchronous run's
    batches: same prompts in the same order, same samples from the same streams, same engine log-probs."""
    batches, cli = _run(tmp_path, *FROZEN, "--data.max_staleness", str(k), max_steps=8)
    assert len(batches) == len(synchronous_frozen) == 4
    assert not any(b["thread"] or b["staleness"] for b in synchronous_frozen), "K=0: today's loop, no thread"
    assert all(b["thread"] for b in batches)
    for i, (got, expected) in enumerate(zip(batches, synchronous_frozen, strict=True)):
        assert got["staleness"] == [min(i, k)] * len(got["rewards"])
        for key in ("prompts", "tokens", "logprobs", "rewards"):
            assert got[key] == expected[key], (i, key)
    logged = scalars(Path(cli.trainer.log_dir))
    assert [s.value for s in logged["rollout/staleness_max"]] == [min(i, k) for i in range(4)]
    assert {"time/wait_for_rollout_s", "time/overlap_frac", "rollout/staleness_mean"} <= set(logged)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_with_batches_in_flight_equals_the_uninterrupted_run(k, tmp_path):
    """The checkpoint keeps the K-1 or K batches generated ahead with weights it no longer holds; the resumed run
    trains them and then generates on from the same position: same samples, same final weights."""
    stale = ("--data.max_staleness", str(k))
    straight, straight_cli = _run(tmp_path / "straight", *stale, max_steps=10)
    _run(tmp_path / "first", *stale, max_steps=4)
    last = tmp_path / "first" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["RolloutDataModule"]
    assert saved["steps"] == 2 and len(saved["in_flight"]["batches"]) == k
    assert saved["cursor"] == 8, "the position of the next batch to train, before the ones in flight"
    resumed, resumed_cli = _run(tmp_path / "resumed", *stale, "--ckpt_path", str(last), max_steps=10)
    assert resumed == straight[2:]
    final = resumed_cli.model.state_dict()
    for name, value in straight_cli.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


def test_a_synchronous_resume_of_an_asynchronous_checkpoint_generates_its_batches_again(tmp_path, recwarn):
    _run(tmp_path / "first", "--data.max_staleness", "1", max_steps=4)
    last = tmp_path / "first" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    resumed, cli = _run(tmp_path / "resumed", "--ckpt_path", str(last), max_steps=6)
    assert len(resumed) == 1 and resumed[0]["staleness"] is None
    assert (cli.datamodule.steps, cli.datamodule.cursor) == (3, 12), "went on from the batch to train, not after"
    assert any("generated again" in str(w.message) for w in recwarn)


def test_multi_turn_trajectories_run_asynchronously(tmp_path):
    batches, cli = _run(tmp_path, "--data.max_staleness", "1", max_steps=6, args=tool_args)
    assert [b["staleness"][0] for b in batches] == [0, 1, 1]
    assert cli.trainer.global_step == 6


# -- refusals ---------------------------------------------------------------------------------------------
def test_negative_staleness_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"data.max_staleness must be >= 0"):
        RolloutDataModule(tokenizer="x", max_staleness=-1)


class EverySecondSync(TransformersEngine):
    sync_every = 2


def test_a_sync_every_above_one_is_refused_with_asynchronous_rollouts():
    with pytest.raises(ValueError, match=r"set sync_every: 1"):
        RolloutDataModule(tokenizer="x", engine=EverySecondSync(), max_staleness=1)
