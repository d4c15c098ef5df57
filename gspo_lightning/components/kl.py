"""Per-token KL estimators of KL(pi_theta || pi_ref) from sampled-token log-probs (Schulman, 2020).

The caller replaces padding log-probs by 0 first (:class:`PolicyObjective` does), so these are plain
elementwise functions. ``ref - lp`` (= log pi_ref / pi_theta) is clamped to +-20 before ``exp`` in k3 for
the same reason as the ratio (see ``clip.LOG_RATIO_BOUND``). As loss terms they pull differently: k1 has
zero expected gradient, k2's is the gradient of KL(pi_theta || pi_ref), k3's that of KL(pi_ref || pi_theta)
(``docs/algorithms.md#kl-penalty``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from gspo_lightning.components.clip import LOG_RATIO_BOUND
from gspo_lightning.registry import Registry


class KL(nn.Module, ABC):
    """Base class: per-token KL penalty towards the reference model."""

    @abstractmethod
    def forward(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        """Args: logprobs (N, T) with gradient; ref_logprobs (N, T). Returns (N, T)."""


KLS: Registry[KL] = Registry("kl", KL)


@KLS.register
class K1KL(KL):
    """k1 estimator: lp - ref (unbiased, high variance, can be negative)."""

    def forward(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return logprobs - ref_logprobs.detach()


@KLS.register
class K2KL(KL):
    """k2 estimator: 0.5 (lp - ref)^2 (biased, low variance, non-negative)."""

    def forward(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        return 0.5 * (logprobs - ref_logprobs.detach()).square()


@KLS.register
class K3KL(KL):
    """k3 estimator: exp(ref - lp) - (ref - lp) - 1 (unbiased, low variance, non-negative; GRPO's choice).

    ``ref - lp`` is clamped to +-20 before ``exp`` (finite in float32), and the result to ``[0, max_value]``,
    as verl's ``low_var_kl`` does (at 10): where the reference gives a sampled token far more mass than the
    policy (``ref - lp`` = 29 gives 4.85e8) one token would otherwise dominate the loss, and its gradient.

    Args:
        max_value: upper clamp of the per-token estimate (None: no clamp).
    """

    def __init__(self, max_value: float | None = 10.0) -> None:
        super().__init__()
        if max_value is not None and max_value <= 0:
            raise ValueError(f"max_value must be > 0 or None, got {max_value}.")
        self.max_value = max_value

    def forward(self, logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
        log_ratio = (ref_logprobs.detach() - logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        return kl if self.max_value is None else kl.clamp(max=self.max_value)
