"""Resuming through the real CLI: ``--ckpt_path last`` after a kill -9, step-for-step equality, bad checkpoints."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from support import ROOT, scalars, tiny_args

from gspo_lightning.checkpoints import PARTIAL_SUFFIX, AtomicCheckpointIO, partial_path
from gspo_lightning.cli import cli_main
from gspo_lightning.rng import rng_states

DATA_STATE = "RolloutDataModule"


class RecordRollouts(Callback):
    """Every rollout batch trained on (step, prompts, sampled tokens, rewards), read from ``outputs``."""

    batches: ClassVar[list[dict]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = outputs["batch"]
        RecordRollouts.batches.append(
            {
                "step": trainer.global_step,
                "prompts": rollout.prompt_index.tolist(),
                "tokens": rollout.input_ids.tolist(),
                "rewards": rollout.rewards.tolist(),
            }
        )


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    """No pytest arguments in sys.argv for LightningCLI to warn about next to ``args``."""
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


def _last(root: Path, version: int = 0) -> Path:
    return root / "lightning_logs" / f"version_{version}" / "checkpoints" / "last.ckpt"


def _record(root: Path, *extra: str, max_steps: int) -> tuple[list[dict], object]:
    RecordRollouts.batches.clear()
    cli = cli_main(
        ["fit", *tiny_args(root, "--trainer.callbacks+=test_resume.RecordRollouts", *extra, max_steps=max_steps)]
    )
    return list(RecordRollouts.batches), cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The last.ckpt of one rollout batch (2 optimizer steps) of the tiny CLI run."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["gspo-lightning"])
        cli_main(["fit", *tiny_args(root, max_steps=2)])
    return _last(root)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# -- 14: the README's resume command ------------------------------------------------------------------------
def test_readme_resume_command_continues_after_kill_9(tmp_path):
    """`gspo-lightning fit --config ... --ckpt_path last` after a kill -9 continues from the last checkpoint."""
    checkpoint_often = tmp_path / "checkpoint_often.yaml"
    checkpoint_often.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_last: true}\n"
    )
    root = tmp_path / "run"
    args = tiny_args(root, "--config", str(checkpoint_often), max_steps=1000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "gspo_lightning.cli", "fit", *args]  # what `gspo-lightning` runs
    log = (tmp_path / "killed.log").open("w")
    running = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not _last(root).exists():
            assert running.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.2)
        time.sleep(1.0)  # let it get on with the next rollout batch
    finally:
        running.send_signal(signal.SIGKILL)
        running.wait()
    saved = torch.load(_last(root), weights_only=False)
    step, rollouts = saved["global_step"], saved[DATA_STATE]["steps"]
    assert step >= 2 and step == 2 * rollouts
    resume = [*command, "--trainer.max_steps", str(step + 4), "--ckpt_path", "last"]
    done = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the resumed run logs to a new version folder and continues the step count of the checkpoint
    resumed = scalars(root / "lightning_logs" / "version_1")
    assert [e.step for e in resumed["rollout/reward_mean"]] == [rollouts, rollouts + 1]
    final = torch.load(_last(root, version=1), weights_only=False)
    assert final["global_step"] == step + 4 and final[DATA_STATE]["steps"] == rollouts + 2


def test_resume_last_without_a_checkpoint_fails_naming_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *tiny_args(tmp_path, max_steps=2), "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert exit_info.value.code not in (0, None) and "\n" not in message
    assert str(tmp_path / "lightning_logs") in message and "--ckpt_path" in message
    assert not (tmp_path / "lightning_logs" / "version_0" / "checkpoints").exists(), "it must not train"


# -- 15: a resumed run equals the uninterrupted one ---------------------------------------------------------
def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    straight, straight_cli = _record(tmp_path / "straight", max_steps=6)
    first, _ = _record(tmp_path / "first", max_steps=2)
    assert first == straight[:1]
    resumed, _ = _record(tmp_path / "resumed", "--ckpt_path", str(_last(tmp_path / "first")), max_steps=6)
    assert [b["step"] for b in resumed] == [4, 6]
    for got, expected in zip(resumed, straight[1:], strict=True):
        assert got["prompts"] == expected["prompts"], "same prompts"
        assert got["tokens"] == expected["tokens"], "same samples"
        assert got["rewards"] == expected["rewards"]
    # same updates: the final weights agree
    final = torch.load(_last(tmp_path / "resumed"), weights_only=False)["state_dict"]
    for name, value in straight_cli.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


# -- 16: held-out baseline, prompt fingerprint, interrupted writes ------------------------------------------
def test_resume_keeps_the_heldout_baseline_and_reads_old_rng_states(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=False)
    baseline = {**ckpt["callbacks"]["HeldOutReport"]["before"], "val/accuracy": 0.375}
    ckpt["callbacks"]["HeldOutReport"]["before"] = baseline
    ckpt["rng_states"] = rng_states()  # what checkpoints of earlier versions carry
    for key in ("rollout_seed", "prompts"):  # not in earlier versions' data module state
        ckpt[DATA_STATE].pop(key, None)
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    cli = cli_main(["fit", *tiny_args(tmp_path, max_steps=4), "--ckpt_path", str(old)])
    assert cli.trainer.global_step == 4
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "HeldOutReport")
    assert report.before == baseline, "the baseline measured before the first update, not a re-evaluation"


def test_checkpoints_load_with_weights_only(trained, tmp_path):
    """What the data module and the RNG helpers save is plain data: Lightning's default safe load reads it."""
    ckpt = torch.load(trained, weights_only=True)
    assert {"rollout_seed", "prompts"} <= set(ckpt[DATA_STATE])
    torch.save({"rng_states": rng_states()}, tmp_path / "rng.pt")
    torch.load(tmp_path / "rng.pt", weights_only=True)


def test_resume_with_another_prompt_set_is_refused(trained, tmp_path):
    other_prompts = ("--data.prompts.init_args.seed", "7")
    with pytest.raises(ValueError, match="another prompt set") as error:
        cli_main(["fit", *tiny_args(tmp_path, *other_prompts, max_steps=4), "--ckpt_path", str(trained)])
    assert "\n" not in str(error.value)


@pytest.fixture()
def lightning_log(caplog):
    """Lightning's log records (its logger does not propagate to the root logger caplog listens on)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_interrupted_checkpoint_write_is_cleaned_up_on_the_next_start(trained, tmp_path, lightning_log):
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(trained, folder / "last.ckpt")
    orphan = partial_path(folder / "last.ckpt", pid=_dead_pid())
    orphan.write_bytes(trained.read_bytes()[:1000])  # killed half-way through writing
    cli = cli_main(["fit", *tiny_args(tmp_path, max_steps=4), "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4
    assert not orphan.exists()
    assert any("interrupted" in r.getMessage() and orphan.name in r.getMessage() for r in lightning_log.records)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    assert io.load_checkpoint(path)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and putting it in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 1, "the previous checkpoint is intact"
    assert [p.name.endswith(PARTIAL_SUFFIX) for p in sorted(tmp_path.iterdir())] == [True, False]


# -- 12e: empty or truncated checkpoints --------------------------------------------------------------------
@pytest.mark.parametrize(("size", "what"), [(0, "empty"), (1000, "truncated")])
def test_empty_or_truncated_checkpoint_is_named(trained, tmp_path, size, what):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(trained.read_bytes()[:size])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *tiny_args(tmp_path, max_steps=4), "--ckpt_path", str(bad)])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(bad) in message and what in message
    assert "another checkpoint" in message
    assert bad.stat().st_size == size, "nothing is deleted"


def test_missing_checkpoint_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *tiny_args(tmp_path, max_steps=4), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    message = str(exit_info.value.code)
    assert "\n" not in message and "nope.ckpt does not exist" in message
