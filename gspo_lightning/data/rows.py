"""Table rows (a ``datasets.Dataset``) -> prompt rows: the prompt (text or chat messages), the answer, the rest.

Shared by the prompt sources that read tables (``FilePrompts``, ``DatasetPrompts``). A prompt cell is either a
string or a conversation, a list of ``{"role", "content"}`` messages (rendered later with the tokenizer's chat
template); every column other than the prompt and the answer travels with the row as an *extra*, which rewards
receive as keyword arguments (as TRL's reward functions do).
"""

from __future__ import annotations

import random
from typing import Any

Row = tuple[str, Any, "tuple[dict[str, Any], ...] | None", dict[str, Any]]
"""(prompt text, raw answer, chat messages or None, extra columns)."""


def is_messages(value: Any) -> bool:
    """Whether ``value`` is a conversation: a non-empty list of dicts with ``role`` and ``content``."""
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


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
    """The rows of ``ds`` as :data:`Row` tuples.

    ``template``: a ``str.format`` template over the row's columns (``"{question}\\nAnswer in \\\\boxed{{}}."``)
    that makes the prompt text; a conversation cell is kept as messages (a template over it is refused).

    Raises:
        ValueError: a prompt that is neither a non-empty string nor a conversation, a template naming an unknown
            column, or a template over a conversation column.
    """
    columns = list(ds.column_names)
    data = {c: ds.data.column(c).to_pylist() for c in columns}
    extra_columns = [c for c in columns if c not in (prompt_column, answer_column)]
    rows: list[Row] = []
    for i, prompt in enumerate(data[prompt_column]):
        record = {c: data[c][i] for c in columns}
        messages = tuple(dict(m) for m in prompt) if is_messages(prompt) else None
        if template is not None:
            if messages is not None:
                raise ValueError(
                    f"{where}: prompt_template formats text, but {prompt_column!r} holds chat messages;"
                    " drop the template."
                )
            try:
                prompt = template.format(**record)
            except IndexError as err:
                raise ValueError(
                    f"prompt_template {template!r} has a positional field such as {{}}: name a column, or double the"
                    " braces ({{}}) for a literal one."
                ) from err
            except KeyError as err:
                raise ValueError(
                    f"prompt_template names column {err.args[0]!r}, which {where} lacks; its columns are {columns}."
                ) from err
        text = _text(prompt, messages, i, where, prompt_column)
        answer = data[answer_column][i] if answer_column is not None else None
        rows.append((text, answer, messages, {c: data[c][i] for c in extra_columns}))
    return rows


def _text(prompt: Any, messages: tuple | None, i: int, where: str, column: str) -> str:
    """The prompt as text: the string itself, or the last user message of a conversation (for logs and rewards)."""
    if messages is not None:
        users = [str(m["content"]) for m in messages if m["role"] == "user"]
        return users[-1] if users else str(messages[-1]["content"])
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            f"Column {column!r} of {where} must hold non-empty strings or chat messages (lists of"
            f" {{'role', 'content'}}), but row {i} holds {type(prompt).__name__} {prompt!r:.80}. Fix the row or pick"
            " another prompt_column."
        )
    return prompt


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
