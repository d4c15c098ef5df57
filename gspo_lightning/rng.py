"""Random streams a resumed run can reproduce.

Rollouts (and held-out evaluations) draw from streams of their own: each is seeded from a base seed, the
rank and the rollout index (:func:`derive_seed`) and swapped into the process's generators only while it
is in use (:func:`seeded_rng`). What they draw then depends on neither what ran before (dataloader set-up,
held-out evaluations, a sanity check) nor on a checkpoint's RNG snapshot: a resumed run draws the same
samples as an uninterrupted one from the rollout index on.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def _cuda_in_use() -> bool:
    # never initialise CUDA (or a context on every device) just to read or seed its generator
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _numpy_state() -> tuple:
    # plain Python values (no ndarray), so a checkpoint holding it loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return name, keys.tolist(), pos, has_gauss, cached


def rng_states() -> dict[str, Any]:
    """The torch (CPU and current CUDA device), Python and NumPy RNG states of this process."""
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "cuda": torch.cuda.get_rng_state() if _cuda_in_use() else None,
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (also the all-device CUDA list older checkpoints carry)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states.get("numpy") is not None:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    cuda = states.get("cuda")
    if cuda is None or not _cuda_in_use():
        return
    if isinstance(cuda, (list, tuple)):
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    else:
        torch.cuda.set_rng_state(cuda)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (e.g. base seed, rank, rollout index), well mixed by SHA-256."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_all(seed: int) -> None:
    """Seed torch (CPU and current CUDA device), Python and NumPy with ``seed``."""
    torch.default_generator.manual_seed(seed)
    if _cuda_in_use():
        torch.cuda.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with every generator seeded with ``seed``; their previous states are put back after."""
    outer = rng_states()
    seed_all(seed)
    try:
        yield
    finally:
        restore_rng_states(outer)
