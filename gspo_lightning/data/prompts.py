"""Prompt records and prompt sources: where the RL prompts (and their reference answers) come from.

A :class:`PromptSource` yields two lists of :class:`PromptRecord`: a train split and a held-out split.
:class:`FilePrompts` reads local JSON / JSONL / Parquet / CSV files through the ``datasets`` library, fully
offline; the synthetic tasks live in :mod:`gspo_lightning.data.tasks`.
"""

from __future__ import annotations

import contextlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gspo_lightning.data.rows import Row, check_val_size, hold_out, is_messages, table_rows
from gspo_lightning.registry import Registry

FileFormat = Literal["auto", "json", "jsonl", "parquet", "csv"]
SUFFIX_FORMATS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_BUILDERS: dict[str, str] = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a split, with its reference answer.

    Attributes:
        text: the user prompt, before any chat template (for a conversation: its last user message).
        answer: the reference answer, ``None`` when the task has none.
        index: position in its split (stable across runs; used to resume).
        messages: a conversation (``{"role", "content"}`` dicts) rendered with the chat template instead of
            ``text``, or None.
        extras: the row's other columns, passed to rewards as keyword arguments.
    """

    text: str
    answer: str | None
    index: int
    messages: tuple[dict[str, Any], ...] | None = field(default=None, compare=False, hash=False)
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


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


def answer_to_str(value: Any, where: str) -> str | None:
    """Convert a reference answer to text: ``57`` and ``57.0`` both give ``"57"``; ``None`` stays ``None``.

    Raises:
        ValueError: the answer is a list, dict or other non-scalar value (``where`` names the row).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(
        f"The answer at {where} is a {type(value).__name__} ({value!r:.80}); answers must be strings or"
        " numbers. Flatten the column to one answer per row, or set answer_column=None."
    )


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
        cache_dir: where ``datasets`` keeps its Arrow cache; ``None`` uses its default.
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
    ) -> None:
        check_val_size(val_size, val_path, "val_path", "path")
        self.path = Path(path).expanduser()
        self.val_path = Path(val_path).expanduser() if val_path is not None else None
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.val_size = val_size
        self.seed = seed
        self.format = format
        self.cache_dir = cache_dir
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

    def _read(self, path: Path) -> list[tuple[str, str | None]]:
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"Prompt file {str(path)!r} {what}. Check the path (relative to {Path.cwd()}).")
        builder = resolve_format(path, self.format)
        if path.stat().st_size == 0:
            raise ValueError(_no_rows(path))
        with _quiet_offline_datasets() as datasets:
            try:
                ds = datasets.load_dataset(
                    builder, data_files=str(path.resolve()), split="train", cache_dir=self.cache_dir
                )
            except Exception as err:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
                if "corresponds to no data" in str(err):  # e.g. a CSV with only a header
                    raise ValueError(_no_rows(path)) from err
                raise ValueError(self._unreadable(path, builder, err)) from err
        if len(ds) == 0:
            raise ValueError(_no_rows(path))
        columns = list(ds.column_names)
        for column, argument in (
            (self.prompt_column, "prompt_column"),
            (self.answer_column, "answer_column"),
        ):
            if column is not None and column not in columns:
                hint = (
                    " (or answer_column=None if there are no reference answers)" if argument == "answer_column" else ""
                )
                raise ValueError(
                    f"{str(path)!r} has no column {column!r}; its columns are {columns}."
                    f" Set {argument}= to one of them{hint}."
                )
        try:  # pyarrow's JSON reader keeps invalid UTF-8, which fails only here
            prompts = ds.data.column(self.prompt_column).to_pylist()
            rows = table_rows(ds, self.prompt_column, self.answer_column, repr(str(path))) if prompts else []
        except UnicodeDecodeError as err:
            raise ValueError(self._unreadable(path, builder, err)) from err
        except ValueError:
            _check_prompts(prompts, path, self.prompt_column)  # the established one-line messages first
            raise
        return [
            (text, answer_to_str(a, f"row {i} of {str(path)!r}") if self.answer_column else None, messages, extras)
            for i, (text, a, messages, extras) in enumerate(rows)
        ]

    def _unreadable(self, path: Path, builder: str, err: BaseException) -> str:
        """One line on why ``path`` could not be read: where it is not UTF-8, or not JSON, else ``err``'s reason."""
        not_utf8 = _utf8_problem(path) if builder in ("json", "csv") else None
        if not_utf8 is not None:
            return not_utf8
        lines = self.format == "jsonl" or path.suffix.lower() == ".jsonl"
        problem = _json_problem(path, lines) if builder == "json" else None
        return f"Could not read {str(path)!r} as {builder}: {problem or _reason(err)}"


def _reason(err: BaseException) -> str:
    """The first line of ``err``'s message, or of its cause's when ``datasets`` wrapped it in a generic one."""
    if type(err).__name__ == "DatasetGenerationError" and err.__cause__ is not None:
        err = err.__cause__
    return next(iter(str(err).splitlines()), "") or type(err).__name__


def _utf8_problem(path: Path) -> str | None:
    """Where ``path`` stops being valid UTF-8 (byte offset and 1-based line) with the fix, or None when valid."""
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):  # b"\n" never occurs inside a UTF-8 character
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"Prompt file {str(path)!r} is not valid UTF-8: byte {offset + e.start} (line {lineno}) is"
                    f" 0x{raw[e.start]:02x} ({e.reason}); save it as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 old > new`"
                    " or your editor's 'Save with encoding UTF-8')."
                )
            offset += len(raw)
    return None


def _json_problem(path: Path, lines: bool) -> str | None:
    """The first place where ``path`` is not valid JSON Lines (``lines``) or JSON, with the fix; None if valid.

    A ``.json`` file whose first line is a JSON object of its own is read as JSON Lines too, as ``datasets``
    does.
    """
    text = path.read_text(encoding="utf-8")
    rows = text.split("\n")
    first = next((row for row in rows if row.strip()), "")
    if not lines and not first.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            lines = isinstance(json.loads(first), dict)
    if not lines:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno} is not valid JSON ({e.msg}); fix the JSON syntax there."
        return None
    for lineno, row in enumerate(rows, 1):
        if not row.strip():
            continue
        try:
            value = json.loads(row)
        except json.JSONDecodeError as e:
            return (
                f"line {lineno} is not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object:"
                " fix or remove that line."
            )
        if not isinstance(value, dict):
            return (
                f"line {lineno} is a {type(value).__name__}, not a JSON object; each line must be one JSON object"
                ' such as {"prompt": ..., "answer": ...}.'
            )
    return None


def _no_rows(path: Path) -> str:
    return f"Prompt file {str(path)!r} has no rows. Point path at a file with prompts."


def _check_prompts(prompts: Sequence[Any], path: Path, column: str) -> None:
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) and not is_messages(p)]
    if bad:
        first = prompts[bad[0]]
        raise ValueError(
            f"Column {column!r} of {str(path)!r} must hold strings, but {len(bad)} row(s) do not (first: row"
            f" {bad[0]}, a {type(first).__name__}: {first!r:.80}). Fix those rows or pick another"
            " prompt_column."
        )
    blank = [i for i, p in enumerate(prompts) if isinstance(p, str) and not p.strip()]
    if blank:
        raise ValueError(
            f"Column {column!r} of {str(path)!r} has {len(blank)} empty prompt(s) (first: row {blank[0]})."
            " Remove those rows."
        )


def _to_records(rows: list[Row]) -> list[PromptRecord]:
    return [
        PromptRecord(text=text, answer=answer, index=i, messages=messages, extras=extras)
        for i, (text, answer, messages, extras) in enumerate(rows)
    ]
