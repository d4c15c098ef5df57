"""What one side of ``benchmarks/e2e_vs_trl.py`` measures in its own process: peak RSS per phase (loading,
first generation, rest of the first rollout batch, later), the ends of rollout batches, generation seconds,
and the library versions."""

from __future__ import annotations

import os
import statistics
import threading
import time

GIB = 2**30
PHASES = ("load", "generate 1", "update 1", "later")  # RSS phases: model loading, the first rollout batch, the rest


class RssMonitor:
    """Samples this process's resident set size on a daemon thread and keeps the peak of each phase.

    A sampled peak can miss an allocation that lives less than ``interval`` seconds; ``ru_maxrss`` is the exact
    whole-run peak.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.phase = "load"
        self.peaks: dict[str, int] = {}
        self._page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def _run(self, interval: float) -> None:
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self._page
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(interval)


class Measure:
    """Ends of rollout batches, generation seconds and RSS phases of one side."""

    def __init__(self) -> None:
        self.monitor = RssMonitor()
        self.ends: list[float] = []
        self.generate_s: list[float] = []

    def timed_generation(self, generate):
        """``generate`` wrapped: its wall time is recorded, and it sets the RSS phase (see ``PHASES``)."""

        def wrapper(*args, **kwargs):
            first = not self.generate_s
            self.monitor.phase = "generate 1" if first else "later"
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.generate_s.append(time.perf_counter() - start)
                self.monitor.phase = "update 1" if first else "later"

        return wrapper

    def result(self, versions: dict[str, str]) -> dict:
        import resource

        import torch

        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]  # the first rollout batch is the warm-up
        generate = statistics.mean(self.generate_s[1 : len(self.ends)])
        total = statistics.mean(steps)
        peaks = {k: v / GIB for k, v in self.monitor.peaks.items()}
        return {
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "s_per_rollout_batch": total,
            "generate_s": generate,
            "update_s": total - generate,
            "rollout_batches": len(self.ends),
            "measured": len(steps),
            "sampled_peak_gib": {k: peaks.get(k, 0.0) for k in PHASES},
            "threads": torch.get_num_threads(),
            "versions": versions,
        }


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in names}
