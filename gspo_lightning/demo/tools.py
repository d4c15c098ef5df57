"""The tool of the embedded agent demo (``configs/tool_demo.yaml``): a calculator for the products the tiny
model cannot compute itself; and the same task as an environment (:class:`CalculatorEnvironment`)."""

from __future__ import annotations

from gspo_lightning.agents.environment import ENVIRONMENTS, Environment, Step, Turn


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor.
        b: the second factor.
    """
    if not isinstance(a, int) or not isinstance(b, int):
        raise TypeError(f"multiply takes two integers, got {a!r} and {b!r}")
    return a * b


@ENVIRONMENTS.register
class CalculatorEnvironment(Environment):
    """The agent demo as an environment: a multiply tool, and reward 1 for a right final answer (TrajectoryReward)."""

    def reset(self, prompt: str, answer: str | None, **columns) -> None:
        self.answer = answer

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: the first factor.
            b: the second factor.
        """
        return multiply(a, b)

    def step(self, turn: Turn) -> Step:
        if turn.parsed.has_calls:
            return self.run_tools(turn.parsed)
        return Step(reward=float(turn.text.strip() == self.answer), done=True)
