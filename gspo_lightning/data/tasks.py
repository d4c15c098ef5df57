"""Synthetic, verifiable prompt tasks generated in memory (no files, no downloads).

:class:`AdditionTask` is the built-in task of the demo: prompts ``"a+b="`` with reference answer ``a+b``;
:class:`MultiplicationTask` that of the agent demo, ``"a*b"`` -> ``a*b``, which a tiny model solves only with a tool.
Every split holds distinct ``(a, b)`` pairs, and no pair is in both splits, so the held-out accuracy
measures generalisation to unseen sums.
"""

from __future__ import annotations

import random

from gspo_lightning.data.prompts import PROMPT_SOURCES, PromptRecord, PromptSource


def distinct_codes(rng: random.Random, total: int, k: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Draw ``k`` distinct integers from ``range(total)`` minus ``exclude``, in random order.

    Rejection sampling while the pool is large; when ``k`` is a sizeable share of what is left, samples the
    explicit complement instead (so drawing every remaining code stays linear).
    """
    available = total - len(exclude)
    if k > available:
        raise ValueError(f"Cannot draw {k} distinct codes from {available}.")
    if 2 * k >= available:
        pool = [c for c in range(total) if c not in exclude]
        return rng.sample(pool, k)
    seen: set[int] = set()
    codes: list[int] = []
    while len(codes) < k:
        code = rng.randrange(total)
        if code not in seen and code not in exclude:
            seen.add(code)
            codes.append(code)
    return codes


@PROMPT_SOURCES.register
class AdditionTask(PromptSource):
    """Built-in verifiable task: n-digit addition 'a+b=' -> 'c'.

    Operands are uniform in ``[0, 10**num_digits - 1]``. The held-out split depends only on
    ``(num_digits, num_val, seed)``, so changing ``num_train`` keeps it fixed.

    With ``reverse_digits`` every number is written least-significant digit first, operands zero-padded to
    ``num_digits`` and the sum to ``num_digits + 1`` digits: ``"12+5="`` becomes ``"21+50="`` -> ``"710"``. Each
    answer digit then follows from digits already seen (the carry travels in writing order), which small models
    learn quickly, and every answer has the same ``num_digits + 1`` tokens: the MoE stability study uses it
    for long responses (6 digits: 7 answer tokens + EOS).

    Args:
        num_digits: the largest operand has this many digits.
        num_train: distinct pairs in the train split.
        num_val: distinct pairs in the held-out split (disjoint from train).
        seed: seed of the generator; same seed, same splits.
        reverse_digits: write numbers least-significant digit first, at fixed widths (see above).

    Raises:
        ValueError: ``num_train + num_val`` exceeds the ``10**(2 * num_digits)`` distinct pairs.
    """

    def __init__(
        self,
        num_digits: int = 2,
        num_train: int = 9500,
        num_val: int = 500,
        seed: int = 0,
        reverse_digits: bool = False,
    ) -> None:
        if num_digits < 1:
            raise ValueError(f"num_digits must be >= 1, got {num_digits}.")
        if num_train < 1 or num_val < 0:
            raise ValueError(f"Need num_train >= 1 and num_val >= 0, got num_train={num_train}, num_val={num_val}.")
        self.num_digits = num_digits
        self.num_train = num_train
        self.num_val = num_val
        self.seed = seed
        self.reverse_digits = reverse_digits
        self.base = 10**num_digits
        total = self.base**2
        if num_train + num_val > total:
            raise ValueError(
                f"{num_digits}-digit addition has only {total} distinct (a, b) pairs, but num_train +"
                f" num_val = {num_train} + {num_val} = {num_train + num_val}. Lower num_train / num_val, or"
                " raise num_digits."
            )
        self._splits: tuple[list[PromptRecord], list[PromptRecord]] | None = None

    def train(self) -> list[PromptRecord]:
        return self._generate()[0]

    def validation(self) -> list[PromptRecord]:
        return self._generate()[1]

    def sft_examples(self, n: int, seed: int) -> list[tuple[str, str]]:
        """``n`` (prompt, completion) pairs from the train split, for a supervised warm-up.

        Draws without replacement while ``n`` fits in the train split, with replacement beyond. The completion
        is the bare answer (no EOS: the caller appends the tokenizer's own).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}.")
        train = self.train()
        rng = random.Random(f"addition-sft-{seed}")
        picked = rng.sample(train, n) if n <= len(train) else rng.choices(train, k=n)
        return [(r.text, r.answer or "") for r in picked]

    def _generate(self) -> tuple[list[PromptRecord], list[PromptRecord]]:
        if self._splits is None:
            total = self.base**2
            tag = f"addition-{self.num_digits}-{self.seed}"
            val_codes = distinct_codes(random.Random(f"{tag}-val"), total, self.num_val)
            train_codes = distinct_codes(random.Random(f"{tag}-train"), total, self.num_train, frozenset(val_codes))
            self._splits = (self._records(train_codes), self._records(val_codes))
        return self._splits

    def _records(self, codes: list[int]) -> list[PromptRecord]:
        records = []
        for i, code in enumerate(codes):
            a, b = divmod(code, self.base)
            if self.reverse_digits:
                n = self.num_digits
                text, answer = f"{a:0{n}d}"[::-1] + "+" + f"{b:0{n}d}"[::-1] + "=", f"{a + b:0{n + 1}d}"[::-1]
            else:
                text, answer = f"{a}+{b}=", str(a + b)
            records.append(PromptRecord(text=text, answer=answer, index=i))
        return records


@PROMPT_SOURCES.register
class MultiplicationTask(PromptSource):
    """Built-in task of the agent demo: n-digit products ``'a*b'`` -> ``' c'`` (the answer after one space).

    Made to be solved with a tool (``gspo_lightning.demo.tools.multiply``): a tiny model cannot multiply two
    2-digit numbers, but it can copy them into a tool call and the result into its answer. Splits hold distinct
    ``(a, b)`` pairs, disjoint between train and held-out, as :class:`AdditionTask`'s.

    Args:
        num_digits: the largest operand has this many digits.
        num_train: distinct pairs in the train split.
        num_val: distinct pairs in the held-out split.
        seed: seed of the generator.
    """

    def __init__(self, num_digits: int = 2, num_train: int = 9000, num_val: int = 500, seed: int = 0) -> None:
        if num_digits < 1 or num_train < 1 or num_val < 0:
            raise ValueError(
                f"Need num_digits >= 1, num_train >= 1, num_val >= 0; got {num_digits}, {num_train}, {num_val}."
            )
        self.base = 10**num_digits
        if num_train + num_val > self.base**2:
            raise ValueError(
                f"{num_digits}-digit multiplication has {self.base**2} distinct pairs, fewer than num_train + num_val"
                f" = {num_train + num_val}: lower them or raise num_digits."
            )
        self.num_digits, self.num_train, self.num_val, self.seed = num_digits, num_train, num_val, seed
        self._splits: tuple[list[PromptRecord], list[PromptRecord]] | None = None

    def train(self) -> list[PromptRecord]:
        return self._generate()[0]

    def validation(self) -> list[PromptRecord]:
        return self._generate()[1]

    def _generate(self) -> tuple[list[PromptRecord], list[PromptRecord]]:
        if self._splits is None:
            total, tag = self.base**2, f"multiplication-{self.num_digits}-{self.seed}"
            val = distinct_codes(random.Random(f"{tag}-val"), total, self.num_val)
            train = distinct_codes(random.Random(f"{tag}-train"), total, self.num_train, frozenset(val))
            self._splits = (self._records(train), self._records(val))
        return self._splits

    def _records(self, codes: list[int]) -> list[PromptRecord]:
        pairs = [divmod(code, self.base) for code in codes]
        return [PromptRecord(text=f"{a}*{b}", answer=str(a * b), index=i) for i, (a, b) in enumerate(pairs)]
