"""Checkpoint files for the CLI: atomic writes, clean-up after a killed save, refusing broken files, ``last``.

``--ckpt_path last`` picks the newest ``last*.ckpt`` of every version folder of the run's logger (each run
logs to a new ``version_N``) and fails with one line when there is none; a checkpoint file that is empty or
truncated is refused with one line before anything is built. Checkpoints are written next to their target
and renamed into place (:class:`AtomicCheckpointIO`); what a killed save leaves is removed on the next start.
"""

from __future__ import annotations

import os
import re
import socket
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

PARTIAL_SUFFIX = ".partial"
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")  # Lightning's names for a checkpoint to find
STALE_PARTIAL_S = 600  # another host's unfinished write untouched this long is an orphan


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
    partial file is removed on the next start (:func:`remove_interrupted_saves`). Remote paths go through
    Lightning's IO.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(target)
        with partial.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)


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


def find_last_checkpoint(trainer: pl.Trainer) -> Path:
    """The newest ``last`` checkpoint across the run's version folders.

    Raises:
        SystemExit: there is none (one line naming the folders searched and the fix).
    """
    searched = checkpoint_folders(trainer)
    candidates = [
        p for cb, folders, _ in searched for f in folders if f.is_dir() for p in f.iterdir() if _is_last(p, cb)
    ]
    if candidates:
        return max(candidates, key=lambda p: p.stat().st_mtime)
    where = ", ".join(label for _, _, label in searched) or "nowhere: no ModelCheckpoint callback is configured"
    raise SystemExit(
        f"error: --ckpt_path last: no last checkpoint (last*.ckpt) in {where}, so there is nothing to resume;"
        " start a new run without --ckpt_path, or pass a checkpoint file with --ckpt_path PATH."
    )
