"""Table rows (a ``datasets.Dataset``) -> prompt rows: the prompt (text or chat messages), the answer, the rest.

Shared by the prompt sources that read tables (``FilePrompts``, ``DatasetPrompts``). A prompt cell is either a
string or a conversation, a list of ``{"role", "content"}`` messages (rendered later with the tokenizer's chat
template); every column other than the prompt and the answer travels with the row as an *extra*, which rewards
receive as keyword arguments (as TRL's reward functions do). The table is converted to Python column by column,
and only the columns a prompt is made of: the extras stay in Arrow and are converted one value at a time when
read (:class:`RowExtras`), so a column nothing reads costs no Python objects. A ``prompt_template`` is checked
here too: its braces when the source is built (:func:`template_fields`), its fields against the columns when
the table is read.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import math
import random
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

Row = tuple[str, "str | None", "tuple[dict[str, Any], ...] | None", Mapping[str, Any]]
"""(prompt text, answer as text or None, chat messages or None, extra columns)."""

MESSAGES_EXAMPLE = '[{"role": "user", "content": "..."}]'


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


def is_messages(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of dicts with a ``role`` and a ``content`` (not
    None: Arrow gives a message without a key its column as None)."""
    return isinstance(value, (list, tuple)) and bool(value) and _not_messages(value) is None


def _not_messages(value: Sequence[Any]) -> str | None:
    """Why a list-like prompt cell is not a conversation, or None when it is one."""
    if not value:
        return "an empty list"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"a list of {type(message).__name__}: {list(value)!r:.80}"
        for key in ("role", "content"):
            if message.get(key) is None:
                return f'message {j} has no "{key}": {message!r:.80}'
    return None


def check_prompts(prompts: Sequence[Any], where: str, column: str) -> None:
    """Refuse prompt cells that are neither strings nor conversations, and empty ones, in one line each.

    Raises:
        ValueError: naming how many rows are bad, the first of them, what is wrong with it and the fix.
    """
    bad: dict[str, list[int]] = {"type": [], "messages": [], "blank": []}
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                bad["blank"].append(i)
        elif isinstance(prompt, (list, tuple)):
            if not is_messages(prompt):
                bad["messages"].append(i)
        else:
            bad["type"].append(i)
    if bad["type"]:
        first = prompts[bad["type"][0]]
        raise ValueError(
            f"Column {column!r} of {where} must hold strings or chat messages, but {len(bad['type'])} row(s) do not"
            f" (first: row {bad['type'][0]}, a {type(first).__name__}: {first!r:.80}). Fix those rows or pick"
            " another prompt_column."
        )
    if bad["messages"]:
        i = bad["messages"][0]
        raise ValueError(
            f"Column {column!r} of {where} has {len(bad['messages'])} row(s) holding a list that is not a conversation"
            f" (first: row {i}, {_not_messages(prompts[i])}). A chat prompt is a list of messages, each with a"
            f' "role" ("system", "user" or "assistant") and a "content", e.g. {MESSAGES_EXAMPLE}: fix those rows'
            " or pick another prompt_column."
        )
    if bad["blank"]:
        raise ValueError(
            f"Column {column!r} of {where} has {len(bad['blank'])} empty prompt(s) (first: row {bad['blank'][0]})."
            " Remove those rows."
        )


def template_fields(template: Any) -> tuple[str, ...]:
    """The columns a ``prompt_template`` formats, in order of first use (format-spec fields included).

    Checked when a source is built, so a brace error is reported before anything is read.

    Raises:
        ValueError: not a string, a single or unclosed brace, a positional field (``{}``, ``{0}``), or an
            unknown conversion (``!z``), in one line naming the template and the fix.
    """
    if not isinstance(template, str):
        raise ValueError(
            f"prompt_template must be a str.format string such as '{{question}}=', got {type(template).__name__}"
            f" {template!r:.80}."
        )
    fields: dict[str, None] = {}
    pending = [template]  # the template, then its fields' format specs (which may hold fields too)
    while pending:
        try:
            parsed = list(string.Formatter().parse(pending.pop()))
        except ValueError as err:
            raise ValueError(_brace_problem(template, err)) from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            name = re.match(r"[^.\[]*", field).group()  # type: ignore[union-attr] (always matches)
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if not name or name.isdigit():
                raise ValueError(
                    f"prompt_template {template!r} has a positional field {shown!r}: name a column in it"
                    " ('{question}'), or double the braces ('{{}}') for literal ones."
                )
            if conversion not in (None, "r", "s", "a"):
                raise ValueError(
                    f"prompt_template {template!r}: the field {shown!r} has an unknown conversion '!{conversion}';"
                    " use !r, !s or !a, or none."
                )
            fields.setdefault(name)
            if spec:
                pending.append(spec)
    return tuple(fields)


def _brace_problem(template: str, err: ValueError) -> str:
    """One line on the brace ``str.format`` could not parse: which, where, and how to write it."""
    found = _stray_brace(template)
    if found is None:
        return (
            f"prompt_template {template!r} is not a str.format template ({err}): fields are column names in"
            " braces ('{question}'), and '{{' and '}}' write literal braces."
        )
    at, brace = found
    if brace == "}":
        return (
            f"prompt_template {template!r} has a single '}}' at character {at}: write '}}}}' for a literal brace,"
            " or open its field with '{'."
        )
    return (
        f"prompt_template {template!r} has a '{{' at character {at} that is never closed: close its field with '}}'"
        " (fields are column names, '{question}'), or write '{{' for a literal brace."
    )


def _stray_brace(template: str) -> tuple[int, str] | None:
    """The position and kind of the first brace that is neither doubled nor part of a closed field."""
    i = 0
    while i < len(template):
        if template.startswith(("{{", "}}"), i):
            i += 2
        elif template[i] == "}":
            return i, "}"
        elif template[i] == "{":
            depth, j = 1, i + 1
            while j < len(template) and depth:
                depth += {"{": 1, "}": -1}.get(template[j], 0)
                j += 1
            if depth:
                return i, "{"
            i = j
        else:
            i += 1
    return None


def _has_json(feature: Any) -> bool:
    """Whether a ``datasets`` feature holds a ``Json`` one (at any depth)."""
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    if isinstance(feature, (list, tuple)):
        return bool(feature) and _has_json(feature[0])
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return _has_json(inner) if inner is not None else type(feature).__name__ == "Json"


def _decoder(ds: Any, column: str) -> Callable[[Any], Any] | None:
    """How to turn a stored value of ``column`` into the row's value, or None when it is stored as it is.

    ``datasets`` (>= 4) stores JSON values of mixed shapes, e.g. messages with different keys, as JSON text (a
    ``Json`` feature); they are decoded, as ``ds[i]`` does. Other decodable features (images, audio) are kept as
    stored.
    """
    feature = (getattr(ds, "features", None) or {}).get(column)
    if feature is None or not _has_json(feature):
        return None
    from datasets.features.features import decode_nested_example

    return lambda value: decode_nested_example(feature, value)


def _pylist(ds: Any, column: str) -> list[Any]:
    """One column of ``ds`` as Python values (decoded as :func:`_decoder` says)."""
    values = ds.data.column(column).to_pylist()
    decode = _decoder(ds, column)
    return values if decode is None else [decode(v) for v in values]


class _Columns:
    """Arrow columns shared by the rows of one table, read one value at a time."""

    def __init__(self, ds: Any, names: list[str]) -> None:
        self.names = tuple(names)
        self.chunks = {name: list(ds.data.column(name).chunks) for name in names}
        self.starts = {
            name: list(itertools.accumulate((len(c) for c in chunks), initial=0))
            for name, chunks in self.chunks.items()
        }
        self.decoders = {name: _decoder(ds, name) for name in names}

    def value(self, name: str, row: int) -> Any:
        starts = self.starts[name]
        j = bisect.bisect_right(starts, row) - 1
        value = self.chunks[name][j][row - starts[j]].as_py()
        decode = self.decoders[name]
        return value if decode is None else decode(value)


class RowExtras(Mapping[str, Any]):
    """One row's extra columns, a read-only mapping whose values are converted from Arrow when read (the same
    values ``to_pylist`` gives): rewards see a few rows per batch, so the rest is never made into Python."""

    __slots__ = ("_columns", "_row")

    def __init__(self, columns: _Columns, row: int) -> None:
        self._columns, self._row = columns, row

    def __getitem__(self, key: str) -> Any:
        if key not in self._columns.chunks:
            raise KeyError(key)
        return self._columns.value(key, self._row)

    def __contains__(self, key: object) -> bool:
        return key in self._columns.chunks

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns.names)

    def __len__(self) -> int:
        return len(self._columns.names)

    def __repr__(self) -> str:
        return repr(dict(self))


def check_columns(columns: list[str], wanted: dict[str, str | None], where: str) -> None:
    """Raise one line naming the missing column and the argument to fix (``wanted``: argument -> column)."""
    for argument, column in wanted.items():
        if column is not None and column not in columns:
            hint = " (or answer_column=None if there are no reference answers)" if argument == "answer_column" else ""
            raise ValueError(
                f"{where} has no column {column!r}; its columns are {columns}. Set {argument}= to one of them{hint}."
            )


def table_rows(
    ds: Any, prompt_column: str, answer_column: str | None, where: str, template: str | None = None
) -> list[Row]:
    """The rows of ``ds`` as :data:`Row` tuples, converted column by column: the prompt column, the answer
    column and the template's fields become Python lists; the other columns stay in Arrow (:class:`RowExtras`).

    ``template``: a ``str.format`` template over the row's columns (``"{question}\\nAnswer in \\\\boxed{{}}."``)
    that makes the prompt text; a conversation cell is kept as messages (a template over it is refused).
    Answers are converted to text (:func:`answer_to_str`).

    Raises:
        ValueError: a prompt that is neither a non-empty string nor a conversation, a template naming an unknown
            column or failing on a row, a template over a conversation column, or an answer that is not a scalar.
    """
    columns = list(ds.column_names)
    fields = template_fields(template) if template is not None else ()
    _check_template_columns(template, fields, columns, where)
    prompts = _pylist(ds, prompt_column)
    if template is None:
        check_prompts(prompts, where, prompt_column)
    messages = [tuple(dict(m) for m in p) if is_messages(p) else None for p in prompts]
    if template is None:
        texts = [_text(p, m) for p, m in zip(prompts, messages)]
    elif any(m is not None for m in messages):
        raise ValueError(
            f"{where}: prompt_template formats text, but {prompt_column!r} holds chat messages; drop the template."
        )
    else:
        values = {f: prompts if f == prompt_column else _pylist(ds, f) for f in fields}
        texts = [_format(template, fields, values, i, where) for i in range(len(prompts))]
    del prompts
    if answer_column is None:
        answers: list[str | None] = [None] * len(texts)
    else:
        answers = [
            a if a is None or type(a) is str else answer_to_str(a, f"row {i} of {where}")
            for i, a in enumerate(_pylist(ds, answer_column))
        ]
    extras = _Columns(ds, [c for c in columns if c not in (prompt_column, answer_column)])
    return list(zip(texts, answers, messages, (RowExtras(extras, i) for i in range(len(texts)))))


def _check_template_columns(template: str | None, fields: tuple[str, ...], columns: list[str], where: str) -> None:
    """Refuse a template field that names no column, suggesting the closest one."""
    for name in fields:
        if name not in columns:
            close = difflib.get_close_matches(name, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"prompt_template names column {name!r}{hint}, which {where} lacks; its columns are {columns}. Fix"
                f" the field in {template!r}, or double its braces ('{{{{' and '}}}}') for literal text."
            )


def _format(template: str, fields: tuple[str, ...], values: dict[str, list[Any]], i: int, where: str) -> str:
    """Row ``i``'s prompt text from ``template``; a failure (a format spec or attribute the value has not) and an
    empty result are refused naming the row."""
    try:
        text = template.format_map({f: values[f][i] for f in fields})
    except Exception as err:
        reason = " ".join(str(err).split())
        raise ValueError(
            f"prompt_template {template!r} could not format row {i} of {where}: {type(err).__name__}: {reason}. Fix"
            " that field's format spec or attribute, or the row."
        ) from err
    if not text.strip():
        raise ValueError(f"prompt_template {template!r} makes an empty prompt of row {i} of {where}; fix the row.")
    return text


def _text(prompt: Any, messages: tuple | None) -> str:
    """The prompt as text: the string itself, or the last user message of a conversation (for logs and rewards)."""
    if messages is None:
        return prompt
    users = [str(m["content"]) for m in messages if m["role"] == "user"]
    return users[-1] if users else str(messages[-1]["content"])


def check_val_size(val_size: Any, separate: Any, separate_name: str, where: str) -> None:
    """Refuse a held-out size that is neither a row count nor a fraction in (0, 1), or one given together with a
    separate held-out set (``separate_name``, e.g. ``val_path``; ``where``: what the rows are split off)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise ValueError(f"val_size must be a row count (int >= 0) or a fraction in (0, 1); got {val_size!r}.")
    if isinstance(val_size, float) and val_size >= 1:
        raise ValueError(f"val_size={val_size!r}: a float is a fraction in (0, 1); pass an int for a row count.")
    if separate is not None and val_size:
        raise ValueError(
            f"Pass either {separate_name} (a held-out set) or val_size (rows split off {where}), not both."
        )


def hold_out(rows: list, val_size: int | float, seed: int, where: str, fix: str) -> tuple[list, list]:
    """``rows`` split into (train, held out): ``val_size`` rows drawn with ``seed`` (held-out ones in row order).

    Raises:
        ValueError: nothing would be left to train on (``fix`` says what to do).
    """
    n = len(rows)
    if not val_size:
        return rows, []
    n_val = val_size if isinstance(val_size, int) else max(1, round(n * val_size))
    if n_val >= n:
        raise ValueError(
            f"val_size={val_size!r} holds out {n_val} of the {n} rows of {where}, leaving no training prompts. {fix}"
        )
    held = set(random.Random(seed).sample(range(n), n_val))
    return [row for i, row in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]
