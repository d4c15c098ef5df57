"""Table rows (a ``datasets.Dataset``) -> prompt rows: the prompt (text or chat messages), the answer, the rest.

Shared by the prompt sources that read tables (``FilePrompts``, ``DatasetPrompts``). A prompt cell is either a
string or a conversation, a list of ``{"role", "content"}`` messages (rendered later with the tokenizer's chat
template); every column other than the prompt and the answer travels with the row as an *extra*, which rewards
receive as keyword arguments (as TRL's reward functions do).
"""

from __future__ import annotations

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
