"""The self-contained demo: a character tokenizer (and, elsewhere, a tiny model) for the addition task."""

from gspo_lightning.demo.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "build_char_tokenizer"]
