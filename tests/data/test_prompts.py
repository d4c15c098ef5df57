"""FilePrompts: JSONL / JSON / CSV / Parquet loading, column options, held-out splits and error messages."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import datasets
import pytest

from gspo_lightning.data import PROMPT_SOURCES, FilePrompts, PromptRecord, answer_to_str

ROWS = [{"question": f"What is {i}+{i}?", "answer": 2 * i, "prompt": f"p{i}"} for i in range(10)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _source(path: str, tmp_path: Path, **kwargs) -> FilePrompts:
    return FilePrompts(path, cache_dir=str(tmp_path / "hf_cache"), **kwargs)


def test_jsonl_with_column_options(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    source = _source(path, tmp_path, prompt_column="question")
    train = source.train()
    assert train[3] == PromptRecord(text="What is 3+3?", answer="6", index=3)
    assert len(train) == 10 and source.validation() == []
    assert source.train() is train  # loaded once, cached


def test_default_columns_and_no_answer(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"prompt": "hi", "answer": "yo"}, {"prompt": "a", "answer": None}])
    source = FilePrompts(path, cache_dir=str(tmp_path / "hf_cache"))  # default columns: prompt, answer
    assert [(r.text, r.answer) for r in source.train()] == [("hi", "yo"), ("a", None)]
    no_answers = FilePrompts(path, answer_column=None, cache_dir=str(tmp_path / "hf_cache")).train()
    assert [r.answer for r in no_answers] == [None, None]


def test_json_array_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "x", "answer": 1.5}, {"prompt": "y", "answer": 2.0}]))
    assert [r.answer for r in _source(str(path), tmp_path).train()] == ["1.5", "2"]


def test_csv_numbers_become_strings(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nfirst,57\nsecond,3\n")
    train = _source(str(path), tmp_path).train()
    assert [(r.text, r.answer) for r in train] == [("first", "57"), ("second", "3")]


def test_parquet_with_integral_floats(tmp_path):
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_list([{"q": "a", "ans": 57.0}, {"q": "b", "ans": 0.25}]).to_parquet(str(path))
    train = _source(str(path), tmp_path, prompt_column="q", answer_column="ans").train()
    assert [(r.text, r.answer) for r in train] == [("a", "57"), ("b", "0.25")]


def test_explicit_format_overrides_extension(tmp_path):
    path = _jsonl(tmp_path / "data.txt", ROWS[:2])
    assert len(_source(path, tmp_path, format="jsonl").train()) == 2


def test_val_size_int_and_fraction(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    source = _source(path, tmp_path, val_size=3, seed=1)
    train, val = source.train(), source.validation()
    assert len(train) == 7 and len(val) == 3
    assert {r.text for r in train} | {r.text for r in val} == {f"p{i}" for i in range(10)}
    assert not {r.text for r in train} & {r.text for r in val}
    assert [r.index for r in train] == list(range(7)) and [r.index for r in val] == list(range(3))
    again = _source(path, tmp_path, val_size=3, seed=1)
    assert again.validation() == val and again.train() == train
    other = [_source(path, tmp_path, val_size=3, seed=s).validation() for s in range(2, 6)]
    assert any(v != val for v in other)
    assert len(_source(path, tmp_path, val_size=0.25).validation()) == 2  # round(10 * 0.25) = 2


def test_val_path(tmp_path):
    train_path = _jsonl(tmp_path / "train.jsonl", ROWS[:6])
    val_path = tmp_path / "val.csv"
    val_path.write_text("prompt,answer\nheld,1\n")
    source = _source(train_path, tmp_path, val_path=str(val_path))
    assert len(source.train()) == 6
    assert source.validation() == [PromptRecord(text="held", answer="1", index=0)]


def test_loading_does_not_touch_the_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("FilePrompts tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    assert len(_source(path, tmp_path).train()) == 10
    assert datasets.config.HF_HUB_OFFLINE in (True, False)  # restored to a bool after loading


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*does not exist"):
        _source(str(missing), tmp_path).train()


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"\.xlsx.*Supported extensions: \.jsonl, \.json, \.parquet, \.csv"):
        _source(str(path), tmp_path)


def test_missing_prompt_column(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column 'text'.*\['question', 'answer', 'prompt'\].*prompt_column="):
        _source(path, tmp_path, prompt_column="text", answer_column=None).train()


def test_missing_answer_column(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column 'solution'.*answer_column=None"):
        _source(path, tmp_path, prompt_column="question", answer_column="solution").train()


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("prompt,answer\n")
    with pytest.raises(ValueError, match=r"empty\.csv.*no rows"):
        _source(str(path), tmp_path).train()


def test_non_string_prompts(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [{"prompt": 1, "answer": "a"}, {"prompt": 2, "answer": "b"}])
    with pytest.raises(ValueError, match=r"Column 'prompt'.*must hold strings.*2 row\(s\).*first: row 0"):
        _source(path, tmp_path).train()


def test_null_and_blank_prompts(tmp_path):
    nulls = _jsonl(tmp_path / "nulls.jsonl", [{"prompt": "ok", "answer": "a"}, {"prompt": None, "answer": "b"}])
    with pytest.raises(ValueError, match=r"must hold strings.*first: row 1, a NoneType"):
        _source(nulls, tmp_path).train()
    blank = _jsonl(tmp_path / "blank.jsonl", [{"prompt": "ok", "answer": "a"}, {"prompt": "  ", "answer": "b"}])
    with pytest.raises(ValueError, match=r"1 empty prompt.*row 1"):
        _source(blank, tmp_path).train()


def test_val_size_errors(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match="leaving no training prompts"):
        _source(path, tmp_path, val_size=10).train()
    with pytest.raises(ValueError, match="fraction in"):
        _source(path, tmp_path, val_size=1.5)
    with pytest.raises(ValueError, match="not both"):
        _source(path, tmp_path, val_size=2, val_path=path)


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a"\nnot json at all\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl.*as json"):
        _source(str(path), tmp_path).train()


def test_answer_to_str():
    assert answer_to_str(57, "x") == "57"
    assert answer_to_str(57.0, "x") == "57"
    assert answer_to_str(-0.5, "x") == "-0.5"
    assert answer_to_str(float("nan"), "x") is None
    assert answer_to_str(None, "x") is None and answer_to_str("7", "x") == "7"
    with pytest.raises(ValueError, match="row 4"):
        answer_to_str([1, 2], "row 4")


def test_registered():
    assert PROMPT_SOURCES.get("FilePrompts") is FilePrompts


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("bad_line", [1, 3, 12])
def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, bad_line):
    lines = [json.dumps(r) for r in ROWS + ROWS[:4]]
    lines[bad_line - 1] = '{"prompt": "p", "answer": '  # cut short
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as err:
        _source(str(path), tmp_path).train()
    msg = _one_line(err)
    assert str(path) in msg and f"line {bad_line} " in msg and "not valid JSON" in msg, msg


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n["b", "2"]\n')
    with pytest.raises(ValueError) as err:
        _source(str(path), tmp_path).train()
    msg = _one_line(err)
    assert str(path) in msg and "line 2 " in msg and "list" in msg and "JSON object" in msg, msg


def test_malformed_json_array_file_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "answer": "1"},\n {"prompt": "b" "answer": "2"}]\n')
    with pytest.raises(ValueError) as err:
        _source(str(path), tmp_path).train()
    msg = _one_line(err)
    assert str(path) in msg and "line 2, column 17" in msg and "not valid JSON" in msg, msg


LATIN1_ROWS = "prompt,answer\nWhat is 1+1?,2\nCaf\u00e9 au lait?,yes\n"


@pytest.mark.parametrize(
    ("name", "text", "offset", "line"),
    [
        ("latin.csv", LATIN1_ROWS, LATIN1_ROWS.index("\u00e9"), 3),
        ("latin.jsonl", '{"prompt": "ok", "answer": "1"}\n{"prompt": "na\u00efve", "answer": "2"}\n', 46, 2),
        ("latin.json", '[{"prompt": "caf\u00e9", "answer": "1"}]', 16, 1),
    ],
)
def test_non_utf8_file_names_byte_line_and_fix(tmp_path, name, text, offset, line):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError) as err:
        _source(str(path), tmp_path).train()
    msg = _one_line(err)
    assert not isinstance(err.value, UnicodeDecodeError)
    assert str(path) in msg and "not valid UTF-8" in msg, msg
    assert f"byte {offset} (line {line})" in msg and "save it as UTF-8" in msg, msg


def test_non_utf8_held_out_file_is_named(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    val = tmp_path / "val.jsonl"
    val.write_bytes('{"prompt": "\u00e9", "answer": "1"}\n'.encode("cp1252"))
    with pytest.raises(ValueError, match=r"val\.jsonl.*not valid UTF-8.*byte 12 \(line 1\)"):
        _source(train, tmp_path, val_path=str(val)).train()
