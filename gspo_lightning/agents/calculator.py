"""The agent demo's task as an environment: a multiply tool, and a reward for the right final answer."""

from __future__ import annotations

from gspo_lightning.agents.environment import ENVIRONMENTS, Environment, Step, Turn
from gspo_lightning.demo.tools import multiply


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
