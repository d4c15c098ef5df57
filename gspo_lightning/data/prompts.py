"""Prompt records and prompt sources: where the RL prompts (and their reference answers) come from.

A :class:`PromptSource` yields two lists of :class:`PromptRecord`: a train split and a held-out split.
:class:`FilePrompts` reads local JSON / JSONL / Parquet / CSV files through the ``datasets`` library, fully
offline and without the user's ``datasets`` cache (a temporary copy, removed once read: an edited file is
always read again); why a file cannot be read is :mod:`gspo_lightning.data.diagnostics`'s to say. The
synthetic tasks live in :mod:`gspo_lightning.data.tasks`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gspo_lightning.data.diagnostics import no_rows, not_utf8, unreadable
from gspo_lightning.data.rows import (
    Row,
    check_columns,
    check_val_size,
    hold_out,
    table_rows,
    template_fields,
)
from gspo_lightning.data.rows import answer_to_str as answer_to_str  # re-exported: it was defined here
from gspo_lightning.registry import Registry

FileFormat = Literal["auto", "json", "jsonl", "parquet", "csv"]
SUFFIX_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_BUILDERS: dict[str, str] = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# The temporary Arrow copy of a prompt file is memory-mapped, and removed once read: on POSIX the mapping outlives
# the file (the columns left in Arrow are paged in only when read); Windows cannot remove a mapped file, so there
# the copy is read into memory.
_IN_MEMORY = os.name == "nt"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a split, with its reference answer.

    Attributes:
        text: the user prompt, before any chat template (for a conversation: its last user message).
        answer: the reference answer, ``None`` when the task has none.
        index: position in its split (stable across runs; used to resume).
        messages: a conversation (``{"role", "content"}`` dicts) rendered with the chat template instead of
            ``text``, or None.
        extras: the row's other columns, passed to rewards as keyword arguments (from a table: a read-only
            mapping whose values are converted from Arrow when read, :class:`~gspo_lightning.data.rows.RowExtras`).
    """

    text: str
    answer: str | None
    index: int
    messages: tuple[dict[str, Any], ...] | None = field(default=None, compare=False, hash=False)
    extras: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


class PromptSource(ABC):
    """A dataset of prompts with a train and a held-out split."""

    @abstractmethod
    def train(self) -> list[PromptRecord]:
        """The training prompts, ``index`` running 0..n-1."""

    @abstractmethod
    def validation(self) -> list[PromptRecord]:
        """The held-out prompts (may be empty), ``index`` running 0..n-1."""


PROMPT_SOURCES: Registry[PromptSource] = Registry("prompt source", PromptSource)


class TablePromptSource(PromptSource):
    """A source read from tables: training rows from one, held-out rows from a second one or drawn from the
    first (``_split``); read once and kept."""

    _splits: tuple[list[PromptRecord], list[PromptRecord]] | None = None

    def train(self) -> list[PromptRecord]:
        return self._load()[0]

    def validation(self) -> list[PromptRecord]:
        return self._load()[1]

    def _load(self) -> tuple[list[PromptRecord], list[PromptRecord]]:
        if self._splits is None:
            rows, held_out = self._train_rows(), self._held_out_rows()
            train_rows, val_rows = (rows, held_out) if held_out is not None else self._split(rows)
            self._splits = (_to_records(train_rows), _to_records(val_rows))
        return self._splits

    @abstractmethod
    def _train_rows(self) -> list[Row]:
        """The training table's rows."""

    @abstractmethod
    def _held_out_rows(self) -> list[Row] | None:
        """The rows of a separate held-out table, or None to draw them from the training rows."""

    @abstractmethod
    def _split(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """(train, held out) drawn from the training rows."""


@contextlib.contextmanager
def _quiet_offline_datasets() -> Iterator[Any]:
    """Import ``datasets`` with the hub switched off and progress bars hidden, restoring both afterwards."""
    import datasets
    from datasets import config as ds_config

    offline, bars_off = ds_config.HF_HUB_OFFLINE, datasets.are_progress_bars_disabled()
    ds_config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        ds_config.HF_HUB_OFFLINE = offline
        if not bars_off:
            datasets.enable_progress_bars()


def resolve_format(path: Path, format: FileFormat) -> str:
    """The ``datasets`` builder name for ``path``: from ``format``, or from the file extension when "auto"."""
    if format != "auto":
        if format not in _BUILDERS:
            raise ValueError(f"Unknown format {format!r}; use one of 'auto', {', '.join(map(repr, _BUILDERS))}.")
        return _BUILDERS[format]
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ValueError(
            f"Cannot tell the format of {str(path)!r} from its extension {suffix or '(none)'!r}. Supported"
            f" extensions: {', '.join(SUFFIX_FORMATS)}. Rename the file or pass"
            " format='json'|'jsonl'|'parquet'|'csv'."
        )
    return SUFFIX_FORMATS[suffix]


@PROMPT_SOURCES.register
class FilePrompts(TablePromptSource):
    """Prompts from a local JSON / JSONL / Parquet / CSV file, one row per prompt.

    Args:
        path: the training file.
        prompt_column: column holding the prompt text.
        answer_column: column holding the reference answer; ``None`` when there is none.
        val_path: a separate held-out file (same columns). When ``None``, ``val_size`` rows of ``path`` are
            held out.
        val_size: rows to hold out from ``path``: an int is a row count, a float in (0, 1) a fraction.
        seed: seed of the deterministic train / held-out split.
        format: file format; "auto" reads it from the extension.
        cache_dir: the folder of the temporary Arrow copy ``datasets`` makes while reading (removed once read; the
            user's ``datasets`` cache is never written); ``None``: the system's temporary folder.
        prompt_template: a ``str.format`` template over the row's columns that makes the prompt text, e.g.
            ``"{question}\\nPut the final answer in \\\\boxed{{}}."``; None uses the prompt column as it is.
    """

    def __init__(
        self,
        path: str,
        prompt_column: str = "prompt",
        answer_column: str | None = "answer",
        val_path: str | None = None,
        val_size: int | float = 0,
        seed: int = 0,
        format: FileFormat = "auto",
        cache_dir: str | None = None,
        prompt_template: str | None = None,
    ) -> None:
        check_val_size(val_size, val_path, "val_path", "path")
        if prompt_template is not None:
            template_fields(prompt_template)  # brace errors now, fields once the columns are known
        self.path = Path(path).expanduser()
        self.val_path = Path(val_path).expanduser() if val_path is not None else None
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.val_size = val_size
        self.seed = seed
        self.format = format
        self.cache_dir = cache_dir
        self.prompt_template = prompt_template
        resolve_format(self.path, format)  # fail early on an unknown extension
        if self.val_path is not None:
            resolve_format(self.val_path, format)

    def _train_rows(self) -> list[Row]:
        return self._read(self.path)

    def _held_out_rows(self) -> list[Row] | None:
        return self._read(self.val_path) if self.val_path is not None else None

    def _split(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        fix = "Lower val_size or pass a separate val_path."
        return hold_out(rows, self.val_size, self.seed, repr(str(self.path)), fix)

    def _read(self, path: Path) -> list[Row]:
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"Prompt file {str(path)!r} {what}. Check the path (relative to {Path.cwd()}).")
        builder = resolve_format(path, self.format)
        if path.stat().st_size == 0:
            raise ValueError(no_rows(path))
        problem = not_utf8(path) if builder == "json" else None  # pyarrow's JSON reader would keep it
        if problem is not None:
            raise ValueError(problem)
        scratch = Path(self.cache_dir).expanduser() if self.cache_dir is not None else None
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix="gspo-prompts-", dir=scratch, ignore_cleanup_errors=True) as copy,
            _quiet_offline_datasets() as datasets,
        ):
            try:
                ds = datasets.load_dataset(
                    builder, data_files=str(path.resolve()), split="train", cache_dir=copy, keep_in_memory=_IN_MEMORY
                )
            except Exception as err:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
                if "corresponds to no data" in str(err):  # e.g. a CSV with only a header
                    raise ValueError(no_rows(path)) from err
                raise ValueError(unreadable(path, builder, self.format, err)) from err
            if len(ds) == 0:
                raise ValueError(no_rows(path))
            wanted = {"prompt_column": self.prompt_column, "answer_column": self.answer_column}
            check_columns(list(ds.column_names), wanted, repr(str(path)))
            try:
                return table_rows(ds, self.prompt_column, self.answer_column, repr(str(path)), self.prompt_template)
            except UnicodeDecodeError as err:
                raise ValueError(unreadable(path, builder, self.format, err)) from err


def _to_records(rows: list[Row]) -> list[PromptRecord]:
    return [
        PromptRecord(text=text, answer=answer, index=i, messages=messages, extras=extras)
        for i, (text, answer, messages, extras) in enumerate(rows)
    ]
