"""Bad prompt input refused in one line, and prompt files read without the datasets cache (issue 22, item 21).

``prompt_template`` braces and fields, chat rows without ``role`` / ``content``, ``FilePrompts`` leaving the
user's datasets cache alone (and never serving a stale copy), unused columns left in Arrow instead of Python.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import datasets
import pytest

from gspo_lightning.data import DatasetPrompts, FilePrompts

ROWS = [{"question": "1+2", "answer": "3", "level": 1}, {"question": "3+4", "answer": "7", "level": 2}]
COLUMNS = "['question', 'answer', 'level']"


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _source(kind: str, tmp_path: Path, rows: list[dict] = ROWS, **kwargs):
    """A FilePrompts or DatasetPrompts (a local folder through load_dataset) over ``rows``."""
    path = _jsonl(tmp_path / "data" / "train.jsonl", rows)
    if kind == "file":
        return FilePrompts(path, cache_dir=str(tmp_path / "scratch"), **kwargs)
    return DatasetPrompts(str(tmp_path / "data"), cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


KINDS = ["file", "dataset"]


# -- prompt_template ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{question}}", ["single '}'", "character 10", "'}}'"]),
        ("Answer {question", ["'{' at character 7", "never closed", "'{{'"]),
        ("{question!z}", ["'{question!z}'", "'!z'", "!r, !s or !a"]),
        ("{} is the question", ["positional field '{}'", "name a column", "'{{}}'"]),
        ("{0}", ["positional field '{0}'"]),
    ],
)
def test_template_brace_errors_are_refused_when_the_source_is_built(tmp_path, kind, template, expected):
    with pytest.raises(ValueError) as err:
        _source(kind, tmp_path, prompt_column="question", prompt_template=template)  # no read needed
    msg = _one_line(err)
    assert msg.startswith("prompt_template ") and repr(template) in msg, msg
    assert all(e in msg for e in expected), msg


@pytest.mark.parametrize("kind", KINDS)
def test_template_field_naming_no_column_lists_the_columns(tmp_path, kind):
    source = _source(kind, tmp_path, prompt_column="question", prompt_template="{questoin}=")
    with pytest.raises(ValueError) as err:
        source.train()
    msg = _one_line(err)
    assert "prompt_template names column 'questoin'" in msg and "did you mean 'question'" in msg, msg
    assert COLUMNS in msg and "'{questoin}='" in msg, msg


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", ["{question:d}", "{question.nope}"])
def test_template_that_fails_on_a_value_names_the_row(tmp_path, kind, template):
    source = _source(kind, tmp_path, prompt_column="question", prompt_template=template)
    with pytest.raises(ValueError) as err:
        source.train()
    msg = _one_line(err)
    assert msg.startswith(f"prompt_template {template!r} could not format row 0 of "), msg


@pytest.mark.parametrize("kind", KINDS)
def test_template_formats_any_column_in_both_sources(tmp_path, kind):
    source = _source(kind, tmp_path, prompt_column="question", prompt_template="{question}= (level {level}, {{x}})")
    train = source.train()
    assert [r.text for r in train] == ["1+2= (level 1, {x})", "3+4= (level 2, {x})"]
    assert [r.answer for r in train] == ["3", "7"] and dict(train[1].extras) == {"level": 2}


# -- chat rows --------------------------------------------------------------------------------------------
GOOD = [{"role": "user", "content": "1+2="}]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("prompts", "expected"),
    [
        ([[{"content": "hi"}]], ["row 0", "message 0", 'no "role"']),
        ([[{"role": "user"}]], ["row 0", "message 0", 'no "content"']),
        ([GOOD, [{"role": "system", "content": "s"}, {"content": "u"}]], ["row 1", "message 1", 'no "role"']),
        ([["just", "text"]], ["row 0", "a list of str"]),
        ([GOOD, []], ["row 1", "an empty list"]),
    ],
)
def test_chat_rows_that_are_not_messages_say_what_is_missing(tmp_path, kind, prompts, expected):
    rows = [{"prompt": p, "answer": "3"} for p in prompts]
    with pytest.raises(ValueError) as err:
        _source(kind, tmp_path, rows).train()
    msg = _one_line(err)
    assert "Column 'prompt' of " in msg and "must hold strings" not in msg, msg
    assert all(e in msg for e in expected), msg
    assert '[{"role": "user", "content": ' in msg, msg  # the expected shape


@pytest.mark.parametrize("kind", KINDS)
def test_messages_with_different_keys_are_messages(tmp_path, kind):
    """datasets stores messages of mixed keys as JSON text (a Json feature): they are read back as messages."""
    named = [{"role": "system", "content": "be brief", "name": "judge"}, {"role": "user", "content": "3+4="}]
    rows = [{"prompt": GOOD, "answer": "3", "meta": {"a": 1}}, {"prompt": named, "answer": "7", "meta": {"b": 2}}]
    train = _source(kind, tmp_path, rows).train()
    assert train[1].messages == tuple(named) and train[1].text == "3+4=" and train[0].messages == tuple(GOOD)
    assert [r.extras["meta"] for r in train] == [{"a": 1}, {"b": 2}]


# -- the datasets cache -------------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """The user's datasets cache, moved to tmp_path (its environment variable and datasets' own paths)."""
    cache = tmp_path / "hf_datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache / "downloads" / "extracted")
    return cache


def test_file_prompts_write_nothing_to_the_datasets_cache(tmp_path, hf_cache):
    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": "aaa", "answer": "1"}])
    assert [r.text for r in FilePrompts(path).train()] == ["aaa"]
    assert _files(hf_cache) == []
    scratch = tmp_path / "scratch"
    assert [r.text for r in FilePrompts(path, cache_dir=str(scratch)).train()] == ["aaa"]
    assert _files(scratch) == [], "the temporary copy is removed after reading"


def test_an_edited_file_is_read_again(tmp_path, hf_cache):
    path = tmp_path / "train.jsonl"
    _jsonl(path, [{"prompt": "aaa", "answer": "1"}])
    before = os.stat(path)
    assert [r.text for r in FilePrompts(str(path)).train()] == ["aaa"]
    _jsonl(path, [{"prompt": "bbb", "answer": "1"}])  # same size; same modification time below
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert [r.text for r in FilePrompts(str(path)).train()] == ["bbb"]


# -- memory: unused columns stay in Arrow ---------------------------------------------------------------------
def _python_bytes_held_by_the_data_package(load) -> tuple[object, int]:
    """``load()``'s result and the Python memory still held after it that was allocated in gspo_lightning.data."""
    tracemalloc.start(1)
    try:
        result = load()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    here = str(Path(__file__).resolve().parents[2] / "gspo_lightning" / "data" / "*")
    held = snapshot.filter_traces([tracemalloc.Filter(True, here)]).statistics("filename")
    return result, sum(s.size for s in held)


@pytest.mark.parametrize("kind", KINDS)
def test_unused_columns_are_not_turned_into_python_objects(tmp_path, kind):
    blob = "x" * 8000
    rows = [{"prompt": f"p{i}", "answer": str(i), "blob": blob, "level": i} for i in range(500)]  # 4 MB of blob
    source = _source(kind, tmp_path, rows)
    train, held = _python_bytes_held_by_the_data_package(source.train)
    assert held < 1_000_000, f"{held} bytes of Python objects held for 500 short prompts"
    assert train[7].extras["blob"] == blob and train[7].extras["level"] == 7 and "blob" in train[7].extras
    assert dict(train[7].extras) == {"blob": blob, "level": 7} and train[7].extras == {"blob": blob, "level": 7}
    assert [r.text for r in train[:2]] == ["p0", "p1"] and train[2].answer == "2"
