"""A rollout engine whose decoding is slow from a given rollout on, for the SIGTERM tests (run in a subprocess)."""

from __future__ import annotations

import time
from pathlib import Path

from gspo_lightning.engines import TransformersEngine


class SlowEngine(TransformersEngine):
    """The embedded engine; from its ``slow_from``-th sampled ``generate`` call on, each forward of the policy
    (prefill and every decoding step) takes ``step_s`` longer and is logged to ``log`` as ``<call> <forward>``.

    Args:
        log: file the forwards of the slow calls are appended to.
        slow_from: index of the first slow sampled call (greedy evaluations are neither slowed nor counted).
        step_s: seconds added to each forward.
    """

    def __init__(self, log: str, slow_from: int = 2, step_s: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log, self.slow_from, self.step_s = Path(log), slow_from, step_s
        self.calls = 0

    def generate(self, prompt_ids, num_samples, greedy=False):
        call = self.calls
        self.calls += not greedy
        if greedy or call < self.slow_from:
            return super().generate(prompt_ids, num_samples, greedy)
        forwards = 0

        def slow(module, args) -> None:
            nonlocal forwards
            forwards += 1
            with self.log.open("a") as f:
                f.write(f"{call} {forwards}\n")
            time.sleep(self.step_s)

        handle = self.policy.register_forward_pre_hook(slow)
        try:
            return super().generate(prompt_ids, num_samples, greedy)
        finally:
            handle.remove()
