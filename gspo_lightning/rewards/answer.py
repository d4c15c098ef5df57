"""Answer-correctness rewards: mathematical equivalence (math-verify) and exact string match.

:class:`MathAnswerReward` has two timeouts with two names. ``verify_timeout_s`` is math-verify's own
(https://github.com/huggingface/Math-Verify): a limit on each parse and each comparison, after which that one
sample scores ``incorrect`` and scoring goes on. math-verify implements it with ``signal.alarm``, which raises
``ValueError`` outside the main thread, so the reward passes it (as ``parsing_timeout`` and
``timeout_seconds``) only in the main thread and switches it off elsewhere, where a pathological expression
(e.g. ``9^{9^{9^9}}``) is then not interrupted. ``timeout_s`` is the wall-clock limit on a whole call that every
reward has (:class:`~gspo_lightning.rewards.base.Reward`): it fails the call, and since it runs the reward on a
worker thread it switches ``verify_timeout_s`` off.
"""

from __future__ import annotations

import functools
import math
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from gspo_lightning.rewards.base import REWARDS, Reward

# answers marked as final: \boxed{...}, "final answer is ...", "answer: ..."; no unanchored fallback
_ANCHORED_ONLY = (
    LatexExtractionConfig(try_extract_without_anchor=False),
    ExprExtractionConfig(try_extract_without_anchor=False),
)
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _main_thread_timeout(seconds: int | None) -> int | None:
    """``seconds`` in the main thread, else None: math-verify's signal-based timeout needs the main thread."""
    return seconds if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str, timeout: int | None) -> tuple:
    """Parse a reference answer; bare LaTeX such as ``3\\pi`` is wrapped in ``$...$`` first."""
    text = answer.strip()
    if "$" not in text and "\\boxed" not in text and "\\(" not in text and "\\[" not in text:
        wrapped = parse(f"${text}$", parsing_timeout=timeout)
        if wrapped:
            return tuple(wrapped)
    return tuple(parse(text, parsing_timeout=timeout))


def _as_number(text: str) -> float | None:
    """``text`` as a float when it is a plain decimal number (thousands commas allowed), else None."""
    text = text.strip().strip("$").strip().replace(",", "")
    return float(text) if _NUMBER.match(text) else None


@REWARDS.register
class MathAnswerReward(Reward):
    """Answer correctness by mathematical equivalence with the reference, using math-verify.

    The rule-based accuracy reward of DeepSeek-R1 (arXiv 2501.12948 §2.2.2) and DAPO (arXiv 2503.14476
    §2.4): ``correct`` when the completion's final answer equals the reference (``\\frac{1}{2}`` = ``0.5``,
    ``57`` = ``\\boxed{57}``), else ``incorrect``. A completion whose answer cannot be parsed scores
    ``incorrect``; when the reference itself cannot be parsed, plain numbers are compared numerically and
    anything else as stripped strings. Words parse as products of symbols (``Paris`` = P*a*r*i*s, which
    an anagram also equals): for text answers prefer :class:`ExactMatchReward`.

    Args:
        correct: score of a correct answer.
        incorrect: score of a wrong or missing answer.
        extract_boxed_or_last: take the last ``\\boxed{}`` answer, or failing that the last expression in
            the text; False accepts only marked answers (``\\boxed{}``, "the final answer is ...").
        verify_timeout_s: math-verify's limit in whole seconds on each parse and each comparison, applied in
            the main thread only (see the module docstring): a sample whose parse or comparison takes longer
            scores ``incorrect``; None (or 0) disables it.
        name: the name used in logs; defaults to the class name.
        timeout_s: a wall-clock limit in seconds on each call (the whole batch), which then runs on a worker
            thread where ``verify_timeout_s`` cannot apply: a pathological expression then fails the call with
            a :class:`~gspo_lightning.rewards.base.RewardError` after ``timeout_s`` instead of scoring
            ``incorrect``. None (the default) keeps scoring in the calling thread.

    Raises:
        ValueError: ``verify_timeout_s`` < 0, or ``timeout_s`` not None or a finite number > 0.
        RewardError: when called on a sample whose reference answer is None.
    """

    def __init__(
        self,
        correct: float = 1.0,
        incorrect: float = 0.0,
        extract_boxed_or_last: bool = True,
        verify_timeout_s: int | None = 5,
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name, timeout_s)
        if verify_timeout_s is not None and verify_timeout_s < 0:
            raise ValueError(f"verify_timeout_s must be >= 0 or None, got {verify_timeout_s}.")
        self.correct = float(correct)
        self.incorrect = float(incorrect)
        self.extract_boxed_or_last = extract_boxed_or_last
        self.verify_timeout_s = verify_timeout_s

    def is_correct(self, completion: str, answer: str) -> bool:
        """Whether ``completion``'s final answer is equivalent to ``answer``."""
        timeout = _main_thread_timeout(self.verify_timeout_s)
        gold = list(_parse_reference(answer, timeout))
        if self.extract_boxed_or_last:
            pred = parse(completion, parsing_timeout=timeout)
        else:
            pred = parse(completion, extraction_config=_ANCHORED_ONLY, parsing_timeout=timeout)
        if gold:
            return bool(pred) and verify(gold, pred, timeout_seconds=timeout)
        # unparseable reference: compare the extracted answer's text (or the completion) directly
        text = next((p for p in pred if isinstance(p, str)), completion)
        a, b = _as_number(answer), _as_number(text)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return text.strip() == answer.strip()

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        if answer is None:
            raise ValueError(
                f"{type(self).__name__} needs a reference answer, but this sample has none (answer=None). "
                "Give the task reference answers, or use a reward that needs none (RegexFormatReward, "
                "OverlongPenalty, FunctionReward)."
            )
        return self.correct if self.is_correct(completion, answer) else self.incorrect


@REWARDS.register
class ExactMatchReward(Reward):
    """Answer correctness by string equality of the whole completion with the reference answer.

    For tasks whose answer is the entire completion (a label, a number, the embedded demo's ``57``).

    Args:
        correct: score of a match.
        incorrect: score of a mismatch.
        strip: strip surrounding whitespace from both before comparing.
        case_sensitive: compare case-sensitively; False compares ``casefold()``-ed strings.
        name: the name used in logs; defaults to the class name.
        timeout_s: a limit in seconds on each call, which then runs on a worker thread; None for none (see
            :class:`~gspo_lightning.rewards.base.Reward`).

    Raises:
        RewardError: when called on a sample whose reference answer is None.
    """

    def __init__(
        self,
        correct: float = 1.0,
        incorrect: float = 0.0,
        strip: bool = True,
        case_sensitive: bool = True,
        name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(name, timeout_s)
        self.correct = float(correct)
        self.incorrect = float(incorrect)
        self.strip = strip
        self.case_sensitive = case_sensitive

    def _normalise(self, text: str) -> str:
        text = text.strip() if self.strip else text
        return text if self.case_sensitive else text.casefold()

    def score_sample(self, prompt: str, completion: str, answer: str | None) -> float:
        if answer is None:
            raise ValueError(
                f"{type(self).__name__} needs a reference answer, but this sample has none (answer=None). "
                "Give the task reference answers, or use a reward that needs none."
            )
        return self.correct if self._normalise(completion) == self._normalise(answer) else self.incorrect
