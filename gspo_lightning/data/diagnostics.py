"""Prompt-file diagnostics: one line saying why a prompt file could not be used, and where to fix it.

When ``datasets`` fails to read a file (or reads no rows), :class:`~gspo_lightning.data.prompts.FilePrompts` asks
this module for the message: the byte and line where the file stops being UTF-8, the line where it stops being
JSON (Lines), or an empty file; failing those, the first line of the reader's own error. (Prompt cells that are
neither text nor chat messages are :func:`gspo_lightning.data.rows.check_prompts`'s to report.)
"""

from __future__ import annotations

import codecs
import contextlib
import json
from pathlib import Path


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


def not_utf8(path: Path) -> str | None:
    """The message for a file that is not valid UTF-8 (where, and the fix), or None: one pass in 1 MiB blocks.

    pyarrow's JSON reader keeps invalid UTF-8 in string columns; columns left in Arrow would fail only when a
    reward reads them, so JSON files are checked when they are read.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return _utf8_problem(path)
    return None


def no_rows(path: Path) -> str:
    """The message for a prompt file without rows."""
    return f"Prompt file {str(path)!r} has no rows. Point path at a file with prompts."


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
