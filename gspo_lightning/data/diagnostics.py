"""Prompt-file diagnostics: one line saying why a prompt file could not be used, and where to fix it.

When ``datasets`` fails to read a file (or reads no rows, or rows whose prompts are not text),
:class:`~gspo_lightning.data.prompts.FilePrompts` asks this module for the message: the byte and line where the
file stops being UTF-8, the line where it stops being JSON (Lines), an empty file, or the prompt rows that are
not strings; failing those, the first line of the reader's own error.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gspo_lightning.data.rows import is_messages


def unreadable(path: Path, builder: str, format: str, err: BaseException) -> str:
    """One line on why ``path`` could not be read: where it is not UTF-8, or not JSON, else ``err``'s reason.

    Args:
        path: the prompt file.
        builder: the ``datasets`` builder it was read with (``"json"``, ``"csv"``, ``"parquet"``).
        format: the format asked for (``"auto"``, ``"jsonl"``, ...), which tells JSON Lines from JSON.
        err: what the reader raised.
    """
    not_utf8 = _utf8_problem(path) if builder in ("json", "csv") else None
    if not_utf8 is not None:
        return not_utf8
    lines = format == "jsonl" or path.suffix.lower() == ".jsonl"
    problem = _json_problem(path, lines) if builder == "json" else None
    return f"Could not read {str(path)!r} as {builder}: {problem or _reason(err)}"


def no_rows(path: Path) -> str:
    """The message for a prompt file without rows."""
    return f"Prompt file {str(path)!r} has no rows. Point path at a file with prompts."


def check_prompts(prompts: Sequence[Any], path: Path, column: str) -> None:
    """Refuse prompts that are neither strings nor chat messages, and empty ones, in one line each.

    Raises:
        ValueError: naming how many rows are bad, the first of them, and the fix.
    """
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
