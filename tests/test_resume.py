"""Resuming through the real CLI: ``--ckpt_path last`` after a kill -9, step-for-step equality, bad checkpoints."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from support import ROOT, scalars, tiny_args

from gspo_lightning.checkpoints import (
    DISTRIBUTED_METADATA,
    PARTIAL_SUFFIX,
    RUN_KEY,
    AtomicCheckpointIO,
    find_last_checkpoint,
    partial_path,
)
from gspo_lightning.cli import cli_main
from gspo_lightning.rng import rng_states

pytest_plugins = ["lightning_log"]  # the lightning_log fixture
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
    # what --ckpt_path last resumes: the checkpoint with the most steps (a kill between a step's file and its
    # last.ckpt leaves last.ckpt one save behind; find_last_checkpoint takes the newer file then)
    complete = sorted(_last(root).parent.glob("*.ckpt"))
    saved = max((torch.load(p, weights_only=False) for p in complete), key=lambda c: c["global_step"])
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


# -- issue 22, 14: `--ckpt_path last` resumes this run, and its newest complete checkpoint -------------------
OTHER_LR = ("--model.optimizer.init_args.lr", "0.001")  # another experiment: the demo's lr is 3e-4


def _folder(root: Path, version: int = 0) -> Path:
    return root / "lightning_logs" / f"version_{version}" / "checkpoints"


def test_resume_last_takes_this_runs_checkpoint_not_a_newer_one_of_another_run(trained, tmp_path):
    _folder(tmp_path).mkdir(parents=True)
    shutil.copy(trained, _folder(tmp_path) / "last.ckpt")  # this run, 2 optimizer steps
    cli_main(["fit", *tiny_args(tmp_path, *OTHER_LR, max_steps=2)])  # another experiment, newer: version_1
    assert _last(tmp_path, 1).exists()
    cli = cli_main(["fit", *tiny_args(tmp_path, max_steps=4), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(_folder(tmp_path) / "last.ckpt")
    assert cli.model.optimizers().param_groups[0]["lr"] == pytest.approx(3e-4), "this run's optimizer state"
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_2" / "config.yaml").read_text())
    assert saved["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(3e-4), "config.yaml is what trains"


def test_resume_last_refuses_another_runs_checkpoints_and_lists_them(trained, tmp_path):
    _folder(tmp_path).mkdir(parents=True)
    shutil.copy(trained, _folder(tmp_path) / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *tiny_args(tmp_path, *OTHER_LR, max_steps=4), "--ckpt_path", "last"])
    message = str(exit_info.value.code)
    assert "\n" not in message and f"{_folder(tmp_path) / 'last.ckpt'} (step 2," in message
    assert "--ckpt_path PATH" in message
    assert not (tmp_path / "lightning_logs" / "version_1").exists(), "nothing trains, no config.yaml is written"


EVERY_2 = (
    "--trainer.callbacks+=ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=2",
    "--trainer.callbacks.save_top_k=-1",
)  # a checkpoint after every rollout batch, all kept


def test_resume_last_takes_the_newest_complete_checkpoint_when_last_is_older(tmp_path, lightning_log):
    cli_main(["fit", *tiny_args(tmp_path, *EVERY_2, max_steps=4)])
    folder = _folder(tmp_path)
    newest = folder / "epoch=0-step=4.ckpt"
    assert newest.exists()
    shutil.copy(folder / "epoch=0-step=2.ckpt", folder / "last.ckpt")  # killed after the step save, before `last`
    (folder / "epoch=0-step=6.ckpt").write_bytes(newest.read_bytes()[:1000])  # and a truncated one: skipped
    cli = cli_main(["fit", *tiny_args(tmp_path, *EVERY_2, max_steps=6), "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(newest)
    said = [r.getMessage() for r in lightning_log.records if r.getMessage().startswith("Resuming from")]
    assert said and str(newest) in said[0] and "step 4" in said[0] and "last.ckpt" in said[0]
    assert cli.trainer.global_step == 6 and cli.datamodule.steps == 3


def test_resume_last_finds_a_sharded_checkpoint_folder(tmp_path):
    """FSDP2 (ModelParallelStrategy) writes each checkpoint as a folder of shards with its metadata in meta.pt:
    ``last`` must see it (it looked for files only and took an older file, or found nothing)."""
    cli_main(["fit", *tiny_args(tmp_path, *EVERY_2, max_steps=4)])
    folder = _folder(tmp_path)
    saved = torch.load(folder / "epoch=0-step=4.ckpt", weights_only=True)
    meta = {k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")} | {"global_step": 8}
    sharded = folder / "epoch=0-step=8.ckpt"
    sharded.mkdir()
    torch.save(meta, sharded / DISTRIBUTED_METADATA)  # the shards themselves are not read to choose
    cli = cli_main(tiny_args(tmp_path, *EVERY_2, max_steps=10), run=False)
    path, line = find_last_checkpoint(cli.trainer, saved[RUN_KEY]["fingerprint"])
    assert path == sharded and "step 8" in line


# -- issue 22, 15: SIGTERM stops with a line naming the checkpoint and the resume command, exit status 143 -----
class SigtermAtStep2(Callback):
    """A plain `kill` of this process once the first rollout batch (2 optimizer steps) is trained."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_between_rollout_batches_exits_143_with_a_line_and_a_checkpoint(tmp_path, capsys):
    from gspo_lightning.cli import main

    args = tiny_args(tmp_path, "--trainer.callbacks+=test_resume.SigtermAtStep2", max_steps=8)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 143
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stopped early at step 2 of 8" in line and str(_last(tmp_path)) in line
    assert line.endswith(f"resume with: {shlex.join(['gspo-lightning', 'fit', *args, '--ckpt_path', 'last'])}")
    saved = torch.load(_last(tmp_path), weights_only=True)
    assert saved["global_step"] == 2 and saved[DATA_STATE]["steps"] == 1


def test_sigterm_mid_generation_stops_within_decoding_steps_and_resumes(tmp_path):
    """`kill` during the third rollout's generation (a slow engine: 40 decoding steps of 0.1 s): it stops a few
    decoding steps later, discards that rollout batch, writes the checkpoint of the 2 trained ones, prints the
    line, exits 143; the printed command resumes on the discarded batch's prompts."""
    log, root = tmp_path / "decode_steps.log", tmp_path / "run"
    engine = json.dumps({"class_path": "slow_engine.SlowEngine", "init_args": {"log": str(log), "slow_from": 2}})
    long_rollouts = ("--data.sampling.max_new_tokens", "40", "--data.heldout.num_samples", "0")
    args = tiny_args(root, "--data.engine", engine, *long_rollouts, max_steps=1000)
    paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    output = tmp_path / "run.log"
    with output.open("w") as out:
        running = subprocess.Popen(
            [sys.executable, "-m", "gspo_lightning.cli", "fit", *args],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not (log.exists() and "2 3\n" in log.read_text()):  # rollout call 2, third forward
                assert running.poll() is None, output.read_text()[-3000:]
                assert time.monotonic() < deadline, "the third rollout did not start in 300 s"
                time.sleep(0.05)
            running.send_signal(signal.SIGTERM)
            code = running.wait(timeout=300)
        finally:
            if running.poll() is None:
                running.kill()
    text = output.read_text()
    assert code == 143, text[-3000:]
    forwards = [int(s) for c, s in (line.split() for line in log.read_text().splitlines()) if c == "2"]
    assert max(forwards) <= 12, f"the generation ran on after the signal: {max(forwards)} of 40 forwards"
    line = text.strip().splitlines()[-1]
    assert "stopped early at step 4 of 1000" in line and "discarded" in line and str(_last(root)) in line
    resume = line.split("resume with: ", 1)[1]
    assert shlex.split(resume) == ["gspo-lightning", "fit", *args, "--ckpt_path", "last"]
    saved = torch.load(_last(root), weights_only=True)
    assert saved["global_step"] == 4
    assert saved[DATA_STATE]["steps"] == 2 and saved[DATA_STATE]["cursor"] == 8, "the discarded batch is not counted"
    cli = cli_main([*shlex.split(resume)[1:], "--trainer.max_steps", "6"])
    assert cli.trainer.global_step == 6 and cli.datamodule.steps == 3 and cli.datamodule.cursor == 12
