"""The demo character tokenizer: ids, exact decode, padding side, save / AutoTokenizer round trip."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gspo_lightning.demo import SPECIAL_TOKENS, build_char_tokenizer


def test_vocabulary_and_special_ids():
    tok = build_char_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerBase)
    assert len(tok) == 16
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ("<pad>", "<eos>", "<bos>", "<unk>")
    assert tok.padding_side == "left"
    assert tok.chat_template is None


def test_one_token_per_character_and_exact_decode():
    tok = build_char_tokenizer()
    ids = tok("12+34=")["input_ids"]
    assert ids == [5, 6, 14, 7, 8, 15]  # no BOS / EOS added
    assert tok.convert_ids_to_tokens(ids) == list("12+34=")
    assert tok.decode(ids) == "12+34="
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == "12+34="
    assert tok.decode([*ids, tok.eos_token_id]) == "12+34=<eos>"


def test_unknown_characters_and_whitespace_alphabet():
    tok = build_char_tokenizer()
    assert tok("1x")["input_ids"] == [5, tok.unk_token_id]
    spaced = build_char_tokenizer("ab \n")
    text = "a b\nba  "
    ids = spaced(text)["input_ids"]
    assert len(ids) == len(text) and spaced.unk_token_id not in ids
    assert spaced.decode(ids) == text


def test_left_padding_batch():
    tok = build_char_tokenizer()
    batch = tok(["1+1=", "12+34="], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0]
    assert batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_bad_alphabets():
    with pytest.raises(ValueError, match="at least one"):
        build_char_tokenizer("")
    with pytest.raises(ValueError, match=r"repeats \['1'\]"):
        build_char_tokenizer("0112")


def test_save_and_reload_with_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer("0123456789+-=", save_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    texts = ["12+34=", "9-3=6", "0"]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    for ids in tok(texts)["input_ids"]:
        assert loaded.decode(ids) == tok.decode(ids)
    assert loaded.decode(loaded("12+34=")["input_ids"]) == "12+34="
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token, loaded.unk_token) == SPECIAL_TOKENS
    assert loaded.padding_side == "left"
    assert loaded(["1", "123"], padding=True)["input_ids"][0] == [0, 0, 5]
