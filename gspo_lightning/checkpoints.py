"""Checkpoint files for the CLI: atomic writes, clean-up after a killed save, refusing broken files, ``last``.

Every checkpoint carries the fingerprint of the run's configuration (:func:`run_fingerprint`, stamped by
:class:`RunFingerprint`). ``--ckpt_path last`` resumes the checkpoint of *this* run with the most optimizer
steps, across the version folders of the run's logger (each start logs to a new ``version_N``), and fails with
one line when there is none (listing the other runs' checkpoints when there are some); a checkpoint file that
is empty or truncated is refused with one line before anything is built. Checkpoints are written next to their
target and renamed into place (:class:`AtomicCheckpointIO`); what a killed save leaves is removed on the next
start, and a save that fills the disk removes its partial file at once and says so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

PARTIAL_SUFFIX = ".partial"
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # Lightning's names for a checkpoint to find
STALE_PARTIAL_S = 600  # another host's unfinished write untouched this long is an orphan
RUN_KEY = "gspo_run"  # the checkpoint entry holding the run's fingerprint (:class:`RunFingerprint`)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def partial_path(target: Path, pid: int | None = None) -> Path:
    """Where :class:`AtomicCheckpointIO` writes ``target`` before renaming it into place."""
    return target.with_name(f".{target.name}.{os.getpid() if pid is None else pid}-{_host()}{PARTIAL_SUFFIX}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing a local checkpoint next to its target and renaming it into place.

    Lightning's own IO writes through an fsspec transaction: a temporary file in the system temp folder,
    moved onto the target at the end, so a kill during the write orphans that file there (and where the
    temp folder is on another file system, the move is a copy that a kill leaves truncated). Here the file
    is written as :func:`partial_path` (``.last.ckpt.<pid>-<host>.partial``), synced, and moved onto the
    target with ``os.replace``: the previous checkpoint stays whole until the new one is. A killed save's
    partial file is removed on the next start (:func:`remove_interrupted_saves`); a save that fails (a full
    disk) removes it at once, and a full device or an exceeded quota is raised as :class:`DiskFullError`, one
    line naming the folder. Remote paths go through Lightning's IO.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except Exception as error:  # not a kill (KeyboardInterrupt): that partial file goes on the next start
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            code = _disk_full_errno(error)
            if code is None:
                raise
            raise DiskFullError(code, _disk_full_message(code, target)) from error


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A checkpoint save found its device full (``ENOSPC``) or its quota exceeded (``EDQUOT``); ``str`` is the
    one-line message (folder, device, what to do), ``errno`` the code."""

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full_errno(error: BaseException | None) -> int | None:
    """``ENOSPC`` or ``EDQUOT`` when ``error``, or an error it was raised from (torch wraps its file writes), is a
    full device or an exceeded quota; else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _disk_full_message(code: int, target: Path) -> str:
    folder = target.absolute().parent
    if code == errno.EDQUOT:
        problem = f"the disk quota for {folder} is exceeded"
    else:
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        problem = f"the device mounted at {_mount_point(folder)} that holds {folder} is full ({free})"
    return (
        f"Could not save the checkpoint {target.name}: {problem}. The partial file was removed and the checkpoints"
        f" already in {folder} are intact; free some space there (or set the ModelCheckpoint's dirpath to another"
        " device), then resume with --ckpt_path last."
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_orphan(path: Path) -> bool:
    """A partial checkpoint whose writer is gone: a dead process of this host, or another host's stale file."""
    owner = path.name.removesuffix(PARTIAL_SUFFIX).rsplit(".", 1)[-1]
    pid, _, host = owner.partition("-")
    if host == _host() and pid.isdigit():
        return not _pid_alive(int(pid))
    return time.time() - path.stat().st_mtime > STALE_PARTIAL_S


def remove_interrupted_saves(folders: Sequence[Path]) -> list[Path]:
    """Delete the partial checkpoint files that killed saves left in ``folders``; returns them."""
    orphans = [p for folder in folders for p in sorted(folder.glob(f".*{PARTIAL_SUFFIX}")) if _is_orphan(p)]
    for path in orphans:
        path.unlink(missing_ok=True)
    return orphans


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint to load (missing, empty, truncated), or None.

    Folders (distributed checkpoints) and remote paths are left to Lightning.
    """
    if "://" in str(path) or path.is_dir():
        return None
    if not path.exists():
        return "does not exist (check the path)"
    size = path.stat().st_size
    damaged = "a save was interrupted or the file was damaged"
    if size == 0:
        return f"is empty (0 bytes): {damaged}"
    with path.open("rb") as f:
        legacy_pickle = f.read(1) == b"\x80"  # torch.save's format before zip archives
    if not zipfile.is_zipfile(path) and not legacy_pickle:
        return f"is truncated or corrupt ({size} bytes, not a complete checkpoint archive): {damaged}"
    return None


def check_checkpoint_file(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` file that is missing, empty or truncated (special values pass).

    Raises:
        SystemExit: one line naming the file, what is wrong and what to do.
    """
    if ckpt_path is None or ckpt_path in SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry:"):
        return
    path = Path(ckpt_path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise SystemExit(
            f"error: --ckpt_path {path} {problem}; pick another checkpoint (an earlier one in"
            f" {path.absolute().parent}), or start a new run without --ckpt_path."
        )


def _is_last(path: Path, callback: ModelCheckpoint) -> bool:
    """Lightning's test for a ``save_last`` file of ``callback`` (the name may hold format fields)."""
    name = re.sub(r"\\\{[^}]*\\\}", ".*", re.escape(callback.CHECKPOINT_NAME_LAST))
    return path.suffix == callback.FILE_EXTENSION and re.match(rf"^{name}(-(\d+))?", path.stem) is not None


def checkpoint_folders(trainer: pl.Trainer) -> list[tuple[ModelCheckpoint, list[Path], str]]:
    """Each ModelCheckpoint's folders across runs, and how to name them in a message.

    A callback without ``dirpath`` writes under the logger's version folder, a new one per run; its
    folders are then those of every version (``<save_dir>/<name>/*/checkpoints``).
    """
    out = []
    for callback in trainer.checkpoint_callbacks:
        if callback.dirpath is not None:
            out.append((callback, [Path(callback.dirpath)], str(callback.dirpath)))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
            out.append((callback, sorted(root.glob("*/checkpoints")), str(root / "*" / "checkpoints")))
        else:
            folder = Path(trainer.default_root_dir) / "checkpoints"
            out.append((callback, [folder], str(folder)))
    return out


RESUME_MAY_CHANGE = (
    # where and how long it runs, what it is resumed from
    "config",
    "ckpt_path",
    "weights_only",
    "verbose",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.min_steps",
    "trainer.min_epochs",
    "trainer.max_time",
    "trainer.default_root_dir",
    # what observes it: logging, callbacks, checkpoints, held-out evaluations, progress
    "trainer.logger",
    "trainer.callbacks",
    "trainer.enable_checkpointing",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.val_check_interval",
    "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches",
    "trainer.num_sanity_val_steps",
    "trainer.profiler",
    "data.heldout.batch_size",
    # how the same gradient is computed (micro-batches and token budgets reproduce the whole-batch gradient)
    "model.batching",
)
"""Options left out of :func:`run_fingerprint`: a resume may change them and still continue the same run."""


def run_fingerprint(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the parsed configuration (a subcommand's namespace) without the options in
    :data:`RESUME_MAY_CHANGE`: two starts are the same run exactly when everything that shapes its training (the
    model and its options, optimizer, scheduler, data, prompts, rewards, engine, sampling, seed, precision,
    strategy, devices) is the same."""
    settings = config.as_dict() if hasattr(config, "as_dict") else json.loads(json.dumps(config, default=str))
    for key in RESUME_MAY_CHANGE:
        *parents, leaf = key.split(".")
        node: Any = settings
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunFingerprint(Callback):
    """Writes the run's fingerprint (:func:`run_fingerprint`) into every checkpoint, as
    ``checkpoint["gspo_run"]["fingerprint"]``, for ``--ckpt_path last`` to find this run's checkpoints."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"fingerprint": self.fingerprint}


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint file ``--ckpt_path last`` may pick: its optimizer steps and run fingerprint (None: unreadable
    or incomplete, or written before fingerprints)."""

    path: Path
    is_last: bool
    mtime: float
    step: int | None = None
    fingerprint: str | None = None
    problem: str | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime))
        if self.problem is not None:
            return f"{self.path} ({self.problem}, {when})"
        unmarked = ", no run fingerprint: written by an earlier version" if self.fingerprint is None else ""
        return f"{self.path} (step {self.step}, {when}{unmarked})"


DISTRIBUTED_METADATA = "meta.pt"
"""What a sharded (distributed) checkpoint folder holds besides its shards: Lightning's ``ModelParallelStrategy``
(FSDP2) and ``FSDPStrategy`` write the checkpoint's non-tensor part there, global step and our keys included."""


def read_saved_checkpoint(path: Path, is_last: bool = False) -> SavedCheckpoint:
    """What :func:`find_last_checkpoint` needs of ``path``, read without loading its tensors (memory-mapped); a
    sharded checkpoint folder is read from its metadata file."""
    mtime = path.stat().st_mtime
    if path.is_dir():
        if not (path / DISTRIBUTED_METADATA).is_file():
            return SavedCheckpoint(path, is_last, mtime, problem=f"a folder without {DISTRIBUTED_METADATA}")
        path_to_read = path / DISTRIBUTED_METADATA
    else:
        path_to_read = path
    problem = checkpoint_problem(path_to_read)
    if problem is not None:
        return SavedCheckpoint(path, is_last, mtime, problem=problem.split(":")[0].removeprefix("is "))
    try:
        try:
            ckpt = torch.load(path_to_read, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torch.save's format before zip archives cannot be memory-mapped
            ckpt = torch.load(path_to_read, map_location="cpu", weights_only=True)
    except Exception as error:
        return SavedCheckpoint(path, is_last, mtime, problem=f"unreadable: {type(error).__name__}")
    run = ckpt.get(RUN_KEY)
    fingerprint = run.get("fingerprint") if isinstance(run, Mapping) else None
    return SavedCheckpoint(path, is_last, mtime, int(ckpt.get("global_step", 0)), fingerprint)


_LISTED = 8  # checkpoints a refusal lists by name


def find_last_checkpoint(trainer: pl.Trainer, fingerprint: str | None) -> tuple[Path, str]:
    """The checkpoint ``--ckpt_path last`` resumes: of the complete checkpoints (``*.ckpt``) in the run's version
    folders whose run fingerprint is ``fingerprint`` (None: any), the one with the most optimizer steps (a
    ``last`` file among equals). Returns it and a line saying which it is and why.

    A kill between a step's checkpoint and its ``last`` save leaves ``last`` behind the step's file: the newer
    one is taken, and the line says so.

    Raises:
        SystemExit: there is none (one line naming the folders searched, or listing the other runs'
            checkpoints there, and how to pick one).
    """
    searched = checkpoint_folders(trainer)
    files = {
        p: _is_last(p, cb)
        for cb, folders, _ in searched
        for f in folders
        if f.is_dir()
        for p in sorted(f.glob(f"*{cb.FILE_EXTENSION}"))
        if p.is_file() or (p / DISTRIBUTED_METADATA).is_file()  # a file, or a sharded checkpoint's folder (FSDP2)
    }
    where = ", ".join(label for _, _, label in searched) or "nowhere: no ModelCheckpoint callback is configured"
    if not files:
        raise SystemExit(
            f"error: --ckpt_path last: no checkpoint (*.ckpt) in {where}, so there is nothing to resume;"
            " start a new run without --ckpt_path, or pass a checkpoint file with --ckpt_path PATH."
        )
    saved = [read_saved_checkpoint(p, is_last) for p, is_last in files.items()]
    ours = [s for s in saved if s.problem is None and fingerprint in (None, s.fingerprint)]
    if not ours:
        newest = sorted(saved, key=lambda s: s.mtime, reverse=True)
        listed = "; ".join(s.describe() for s in newest[:_LISTED])
        more = f"; and {len(newest) - _LISTED} more" if len(newest) > _LISTED else ""
        raise SystemExit(
            f"error: --ckpt_path last: none of the {len(saved)} checkpoint(s) in {where} is of this run (they"
            " were written with another configuration; trainer.max_steps, the logger, callbacks and the other"
            f" options a resume may change are not compared): {listed}{more}. To continue one of them anyway, pass"
            " it with --ckpt_path PATH (its model options are then taken from the checkpoint); or start a new run"
            " without --ckpt_path."
        )
    best = max(ours, key=lambda s: (s.step, s.is_last, s.mtime))
    line = f"Resuming from {best.path} (step {best.step}, the newest checkpoint of this run"
    behind = [s for s in ours if s.is_last and s.step < best.step and s.path.parent == best.path.parent]
    if not best.is_last and behind:
        last = max(behind, key=lambda s: s.step)
        line += f"; {last.path.name} is behind it, at step {last.step}: the run stopped between the two saves"
    others = len(saved) - len(ours)
    if others:
        line += f"; {others} checkpoint(s) of other runs, or incomplete, in these folders are left alone"
    return best.path, line + ")"
