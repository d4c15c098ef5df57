"""Skipping optimizer steps whose gradient is not finite, and stopping when they keep coming."""

from __future__ import annotations

from torch import Tensor, nn


class NonFiniteGuard:
    """Drops a non-finite gradient before the optimizer uses it; raises after ``patience`` in a row.

    The gradient norm it checks is global (all ranks), so every rank makes the same decision. Dropping means
    setting the gradients to None: torch optimizers skip parameters without a gradient (no update, no moment
    update), so the weights stay finite.

    Args:
        patience: consecutive skipped steps that stop the run.
    """

    def __init__(self, patience: int = 3) -> None:
        if patience < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {patience}.")
        self.patience = patience
        self.in_a_row = 0

    def __call__(self, norm: Tensor, nonfinite: bool, policy: nn.Module) -> bool:
        """Whether this step is skipped (its gradients dropped).

        Raises:
            RuntimeError: ``patience`` steps in a row were non-finite.
        """
        if not nonfinite:
            self.in_a_row = 0
            return False
        policy.zero_grad(set_to_none=True)
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            raise RuntimeError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite gradient (norm {float(norm)}) and were"
                " skipped: lower the learning rate or check the rewards; the checkpoints written so far are kept."
            )
        return True
