"""encode_prompts: batched tokenisation, overlong filtering, chat templates and BOS handling."""

from __future__ import annotations

import pytest
from tokenizers import processors

from gspo_lightning.data import EncodedPrompt, PromptRecord, encode_prompts
from gspo_lightning.demo import build_char_tokenizer

TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def _records(*texts: str) -> list[PromptRecord]:
    return [PromptRecord(text=t, answer=None, index=i) for i, t in enumerate(texts)]


@pytest.fixture
def tok():
    return build_char_tokenizer()


@pytest.fixture
def chat_tok():
    tok = build_char_tokenizer("0123456789+=usa:|")
    tok.chat_template = TEMPLATE
    return tok


def test_raw_prompts_are_tokenised_per_character(tok):
    records = _records("1+2=", "12+34=")
    kept, dropped = encode_prompts(records, tok, max_prompt_length=10)
    assert dropped == 0
    assert kept == [
        EncodedPrompt(records[0], [5, 14, 6, 15]),
        EncodedPrompt(records[1], [5, 6, 14, 7, 8, 15]),
    ]


def test_tokenizer_called_once_for_the_batch(tok, monkeypatch):
    calls = []
    original = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    encode_prompts(_records("1+2=", "3+4=", "5+6="), tok, max_prompt_length=10)
    assert len(calls) == 1 and calls[0] == ["1+2=", "3+4=", "5+6="]


def test_overlong_prompts_are_dropped_in_order(tok):
    records = _records("1+1=", "123+456=", "9+9=", "1234+1=")
    kept, dropped = encode_prompts(records, tok, max_prompt_length=6)
    assert dropped == 2
    assert [e.record.index for e in kept] == [0, 2]
    kept, dropped = encode_prompts(records, tok, max_prompt_length=8)  # the limit itself is allowed
    assert dropped == 0 and len(kept) == 4


def test_overlong_error_option(tok):
    records = _records("1+1=", "123+456=", "1234+1=")
    with pytest.raises(ValueError, match=r"2 of 3 prompts exceed max_prompt_length=4.*longest: 8.*on_overlong='drop'"):
        encode_prompts(records, tok, max_prompt_length=4, on_overlong="error")
    kept, dropped = encode_prompts(records[:1], tok, max_prompt_length=4, on_overlong="error")
    assert dropped == 0 and len(kept) == 1


def test_all_dropped_raises(tok):
    with pytest.raises(ValueError, match=r"All 2 prompts exceed max_prompt_length=2.*Raise max_prompt_length"):
        encode_prompts(_records("1+1=", "22+2="), tok, max_prompt_length=2)


def test_empty_input_and_bad_options(tok):
    assert encode_prompts([], tok, max_prompt_length=4) == ([], 0)
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_prompts(_records("1"), tok, max_prompt_length=0)
    with pytest.raises(ValueError, match="on_overlong"):
        encode_prompts(_records("1"), tok, max_prompt_length=4, on_overlong="truncate")


def test_chat_template_applied_when_present(chat_tok):
    kept, _ = encode_prompts(_records("1+2="), chat_tok, max_prompt_length=64)
    assert chat_tok.decode(kept[0].input_ids) == "u:1+2=|a:"
    raw, _ = encode_prompts(_records("1+2="), chat_tok, max_prompt_length=64, chat_template=False)
    assert chat_tok.decode(raw[0].input_ids) == "1+2="


def test_chat_template_counts_towards_the_length(chat_tok):
    kept, dropped = encode_prompts(_records("1+2=", "11+22="), chat_tok, max_prompt_length=10)
    assert dropped == 1 and chat_tok.decode(kept[0].input_ids) == "u:1+2=|a:"


def test_system_prompt(chat_tok, tok):
    kept, _ = encode_prompts(_records("1+2="), chat_tok, max_prompt_length=64, system_prompt="us")
    assert chat_tok.decode(kept[0].input_ids) == "s:us|u:1+2=|a:"
    with pytest.raises(ValueError, match="system_prompt needs a chat template"):
        encode_prompts(_records("1+2="), tok, max_prompt_length=64, system_prompt="us")


def test_chat_template_true_without_template_raises(tok):
    with pytest.raises(ValueError, match=r"chat_template=True.*has no chat template"):
        encode_prompts(_records("1+2="), tok, max_prompt_length=64, chat_template=True)


def test_bos_is_not_duplicated(chat_tok):
    backend = chat_tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    bos = chat_tok.bos_token_id
    raw, _ = encode_prompts(_records("1+2="), chat_tok, max_prompt_length=64, chat_template=False)
    assert raw[0].input_ids[:2] == [bos, 5]  # raw text: the tokenizer's own BOS is kept
    already, _ = encode_prompts(_records("<bos>1+2="), chat_tok, max_prompt_length=64, chat_template=False)
    assert already[0].input_ids == raw[0].input_ids
    chat_tok.chat_template = "{{ bos_token }}" + TEMPLATE
    templated, _ = encode_prompts(_records("1+2="), chat_tok, max_prompt_length=64)
    assert templated[0].input_ids.count(bos) == 1 and templated[0].input_ids[0] == bos
    assert chat_tok.decode(templated[0].input_ids) == "<bos>u:1+2=|a:"
