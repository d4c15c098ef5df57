"""`DatasetPrompts`: prompts from a ``datasets`` dataset by name (a hub id online, a local folder offline).

``datasets.load_dataset(path, name, split=...)`` takes a hub id, a local folder of data files, or a dataset
script folder; a ``save_to_disk`` folder is read with ``datasets.load_from_disk``. Prompts may be text (optionally
formatted by ``prompt_template`` from the row's columns) or chat messages; the other columns reach the rewards
(:mod:`gspo_lightning.data.rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gspo_lightning.data.prompts import PROMPT_SOURCES, TablePromptSource
from gspo_lightning.data.rows import Row, check_columns, check_val_size, hold_out, table_rows, template_fields


def _is_saved_to_disk(path: str) -> bool:
    folder = Path(path).expanduser()
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


@PROMPT_SOURCES.register
class DatasetPrompts(TablePromptSource):
    """Prompts from ``datasets.load_dataset(path, name, split=split)`` (or ``load_from_disk(path)``).

    Args:
        path: a hub id (``"openai/gsm8k"``), a local dataset folder, or a ``save_to_disk`` folder.
        name: the dataset configuration (``"main"``), if it has several.
        split: the training split.
        prompt_column: the column holding the prompt: text, or chat messages (``[{"role", "content"}, ...]``).
        answer_column: the reference answers' column; None when there is none.
        prompt_template: a ``str.format`` template over the row's columns that makes the prompt text, e.g.
            ``"{question}\\nPut the final answer in \\\\boxed{{}}."``; None uses the prompt column as it is.
        val_split: a held-out split by name (``"test"``); or else
        val_size: rows held out from ``split``: an int is a row count, a float in (0, 1) a fraction.
        seed: seed of the held-out draw.
        cache_dir: the ``datasets`` cache folder.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        split: str = "train",
        prompt_column: str = "prompt",
        answer_column: str | None = "answer",
        prompt_template: str | None = None,
        val_split: str | None = None,
        val_size: int | float = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        check_val_size(val_size, val_split, "val_split", "split")
        if prompt_template is not None:
            template_fields(prompt_template)  # brace errors now, fields once the columns are known
        self.path, self.name, self.split = path, name, split
        self.prompt_column, self.answer_column, self.prompt_template = prompt_column, answer_column, prompt_template
        self.val_split, self.val_size, self.seed, self.cache_dir = val_split, val_size, seed, cache_dir

    def _train_rows(self) -> list[Row]:
        return self._rows(self.split)

    def _held_out_rows(self) -> list[Row] | None:
        return self._rows(self.val_split) if self.val_split is not None else None

    def _split(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        where = f"{self.path!r} split {self.split!r}"
        return hold_out(rows, self.val_size, self.seed, where, "Lower val_size or name a val_split.")

    def _rows(self, split: str) -> list[Row]:
        ds = self._dataset(split)
        where = f"{self.path!r} split {split!r}"
        if len(ds) == 0:
            raise ValueError(f"{where} has no rows.")
        wanted = {"prompt_column": self.prompt_column, "answer_column": self.answer_column}
        check_columns(list(ds.column_names), wanted, where)
        return table_rows(ds, self.prompt_column, self.answer_column, where, self.prompt_template)

    def _dataset(self, split: str) -> Any:
        import datasets

        if _is_saved_to_disk(self.path):
            loaded = datasets.load_from_disk(str(Path(self.path).expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{self.path!r} has no split {split!r}; its splits are {list(loaded)}.")
                return loaded[split]
            if split != self.split:
                raise ValueError(f"{self.path!r} was saved as one dataset: there is no split {split!r}; use val_size.")
            return loaded
        try:
            return datasets.load_dataset(self.path, self.name, split=split, cache_dir=self.cache_dir)
        except ValueError as err:  # e.g. an unknown split: datasets names the ones there are
            raise ValueError(f"Could not load {self.path!r} (name={self.name!r}, split={split!r}): {err}") from err
