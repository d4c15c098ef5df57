"""A character-level tokenizer for the demo task, built offline with the ``tokenizers`` library.

Every character of the alphabet is one token; there are no merges, no normaliser and no added spaces, so
``decode(encode(text)) == text`` for any text over the alphabet. It saves and reloads through
``save_pretrained`` / ``AutoTokenizer.from_pretrained`` exactly like a real model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, BOS, UNK)  # ids 0..3, in this order
DEFAULT_ALPHABET = "0123456789+="


def build_char_tokenizer(
    alphabet: str = DEFAULT_ALPHABET, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer with one token per character of ``alphabet``.

    Ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then the characters in order.
    No BOS/EOS is added when encoding, padding is on the left (for generation), and there is no chat template.

    Args:
        alphabet: the characters, each becoming one token in this order.
        save_dir: when given, ``save_pretrained`` writes the tokenizer there.

    Raises:
        ValueError: an empty alphabet or a repeated character.
    """
    if not alphabet:
        raise ValueError("alphabet must hold at least one character.")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats {repeated!r}; list each character once.")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "[\s\S]" (not ".") so that newlines are split into tokens too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join tokens with no separator
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
TOOL_TAGS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<tools>",
    "</tools>",
)
CHAT_ALPHABET = "0123456789+-*/=()[]{}<>\"':;,.!?_ \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

# A compact tool-capable template in the Hermes / Qwen style: the tools' names are declared up front, the
# assistant's tool calls are <tool_call>{json}</tool_call>, consecutive tool results share one user turn as
# <tool_response>...</tool_response>, and every turn ends with the EOS token the model samples.
CHAT_TEMPLATE = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name if t.function is defined else t.name }}"
    "{% if not loop.last %},{% endif %}{% endfor %}</tools>{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}<|system|>{{ m.content }}<eos>"
    "{%- elif m.role == 'user' %}<|user|>{{ m.content }}<eos>"
    "{%- elif m.role == 'assistant' %}<|assistant|>{{ m.content or '' }}"
    "{%- for c in (m.tool_calls or []) %}<tool_call>"
    '{"name":"{{ c.function.name }}","arguments":{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<eos>'
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.previtem is not defined or loop.previtem.role != 'tool' %}<|user|>{% endif %}"
    "<tool_response>{{ m.content }}</tool_response>"
    "{%- if loop.nextitem is not defined or loop.nextitem.role != 'tool' %}<eos>{% endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_chat_tokenizer(alphabet: str = CHAT_ALPHABET, save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer with role tokens, Hermes-style tool tags and a tool-capable chat template.

    Role markers (``<|user|>``, ``<|assistant|>``, ``<|system|>``) are special tokens (dropped when decoding with
    ``skip_special_tokens``); the tool tags are ordinary added tokens, so a decoded turn keeps its
    ``<tool_call>...</tool_call>`` for the parser. Ids: the four specials, the alphabet, the role tokens, the tags.
    """
    tokenizer = build_char_tokenizer(alphabet)
    tokenizer.add_special_tokens({"additional_special_tokens": [USER, ASSISTANT, SYSTEM]})
    tokenizer.add_tokens(list(TOOL_TAGS))
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
