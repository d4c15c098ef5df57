"""RNG states saved in checkpoints, so a resumed run continues the same random streams."""

from __future__ import annotations

import random
from typing import Any

import torch


def rng_states() -> dict[str, Any]:
    """The torch, Python and CUDA RNG states of this process."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
