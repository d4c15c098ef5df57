"""The tool of the embedded agent demo (``configs/tool_demo.yaml``): a calculator for the products the tiny
model cannot compute itself(the same task as an environment: ``gspo_lightning.agents.calculator``)."""

from __future__ import annotations


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor.
        b: the second factor.
    """
    if not isinstance(a, int) or not isinstance(b, int):
        raise TypeError(f"multiply takes two integers, got {a!r} and {b!r}")
    return a * b
