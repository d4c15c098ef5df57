"""Asynchronous rollouts with bounded staleness (``data.max_staleness: K``).

Rollout batch ``s`` is generated on a background thread with policy version ``v(s) = max(first, s - K)`` (version
``v``: the weights after ``v`` rollout batches were trained on; ``first``: the version the run started or resumed
at), while the trainer trains the batches before it. The trainer trains batch ``s`` at version ``s``, so every
sample's staleness is ``s - v(s) = min(s - first, K)``: never more than K updates.

The schedule is fixed, not "as fresh as the producer happens to find": batch ``s`` always waits for version
``s - K`` and uses exactly it, so what a batch holds depends on the seeds and the weights, never on thread timing.
That keeps runs reproducible and resumes exact (the batches in flight at a checkpoint, which need versions no
longer held, are saved in it: :meth:`RolloutPipeline.pending`), and it costs no speed: a fresher version of batch
``s``'s weights exists only later. prime-rl's ``async_level`` and verl's one-step-off trainer (K = 1) schedule
the same way.

Weights flow one way: after each update the trainer thread *publishes* a snapshot (:class:`WeightVersions`),
the producer *loads* the version a batch needs into the engine's own copy of the policy between two batches, so
no generation ever sees weights change under it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from gspo_lightning.batch import RolloutBatch


class PipelineClosed(RuntimeError):
    """The pipeline was closed while a call waited on it."""


class WeightVersions:
    """Weight snapshots by version: published by the trainer thread, taken by the producer (oldest dropped)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._snapshots: dict[int, Any] = {}
        self.latest = -1
        self.closed = False

    def publish(self, version: int, snapshot: Any) -> None:
        """Make ``snapshot`` the weights of ``version`` (versions come in increasing order)."""
        with self._cond:
            self._snapshots[version] = snapshot
            self.latest = max(self.latest, version)
            self._cond.notify_all()

    def wait_for(self, version: int) -> Any:
        """The snapshot of ``version``, once published; raises :class:`PipelineClosed` if closed first."""
        with self._cond:
            self._cond.wait_for(lambda: version in self._snapshots or self.closed)
            if self.closed:
                raise PipelineClosed("the rollout pipeline was closed")
            return self._snapshots[version]

    def drop_before(self, version: int) -> None:
        """Forget the snapshots older than ``version`` (no later batch needs them)."""
        with self._cond:
            for v in [v for v in self._snapshots if v < version and v != self.latest]:
                del self._snapshots[v]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class RolloutPipeline:
    """Generates rollout batches ahead of the trainer on one background thread, each from its own version.

    Args:
        produce: ``produce(s)`` generates, scores and assembles rollout batch ``s`` with the weights the engine
            holds (its prompts and seeds come from ``s`` and the data module's position in the prompt order).
        load: ``load(snapshot)`` puts a published snapshot into the engine's copy of the policy.
        position: the data module's position in the prompt order (saved before each batch, for checkpoints).
        max_staleness: K >= 1.
        first: the version the trainer holds now (the number of rollout batches trained on so far).
        pending: batches already generated at an earlier run's checkpoint (index -> batch), trained first.
        positions: the positions before each batch of ``pending`` (index -> position; the one after them is
            ``position()``).
    """

    def __init__(
        self,
        produce: Callable[[int], RolloutBatch],
        load: Callable[[Any], None],
        position: Callable[[], dict[str, int]],
        max_staleness: int,
        first: int,
        pending: dict[int, RolloutBatch] | None = None,
        positions: dict[int, dict[str, int]] | None = None,
    ) -> None:
        if max_staleness < 1:
            raise ValueError(f"RolloutPipeline needs max_staleness >= 1, got {max_staleness}.")
        self.produce, self.load, self.position = produce, load, position
        self.max_staleness, self.first = max_staleness, first
        self.versions = WeightVersions()
        self._cond = threading.Condition()
        self._ready: dict[int, RolloutBatch] = dict(pending or {})
        self._next = first + len(self._ready)  # the next batch the producer makes
        self._positions: dict[int, dict[str, int]] = {**(positions or {}), self._next: position()}
        self._error: BaseException | None = None
        self._engine_lock = threading.RLock()  # the producer's, or the trainer thread's (evaluation)
        self._loaded: int | None = None  # the version the engine holds
        self._thread: threading.Thread | None = None

    def version_for(self, index: int) -> int:
        """The policy version that generates rollout batch ``index``."""
        return max(self.first, index - self.max_staleness)

    def start(self, snapshot: Any) -> None:
        """Publish the trainer's current weights as version ``first`` and start the producer thread."""
        self.versions.publish(self.first, snapshot)
        self._thread = threading.Thread(target=self._run, name="gspo-rollouts", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        # on a GPU, kernels of one stream run in order: generation gets a stream of its own to overlap training's
        stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        try:
            while True:
                index = self._next
                version = self.version_for(index)
                snapshot = self.versions.wait_for(version)
                with self._engine_lock, torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    if self._loaded != version:
                        self.load(snapshot)
                        self._loaded = version
                    batch = self.produce(index)
                    if stream is not None:
                        stream.synchronize()  # the batch's tensors are complete before the trainer reads them
                batch.policy_version = torch.full((len(batch),), version, dtype=torch.long)
                with self._cond:
                    self._ready[index] = batch
                    self._next = index + 1
                    self._positions[index + 1] = self.position()
                    self._cond.notify_all()
                self.versions.drop_before(self.version_for(index + 1))
        except PipelineClosed:
            pass
        except BaseException as error:  # handed to the trainer thread, raised by its next take()
            with self._cond:
                self._error = error
                self._cond.notify_all()

    def _wait(self, done: Callable[[], bool]) -> None:
        """Wait (holding the condition) until ``done()``; raise the producer's error if it failed first."""
        self._cond.wait_for(lambda: done() or self._error is not None or not self.running)
        if done():
            return
        if self._error is not None:
            raise self._error
        raise PipelineClosed("the rollout pipeline stopped before producing what was asked")

    def take(self, index: int) -> tuple[RolloutBatch, float]:
        """Rollout batch ``index`` (removed from the pipeline) and the seconds the caller waited for it."""
        start = time.perf_counter()
        with self._cond:
            self._wait(lambda: index in self._ready)
            batch = self._ready.pop(index)
            for i in [i for i in self._positions if i < index]:
                del self._positions[i]
        return batch, time.perf_counter() - start

    def publish(self, version: int, snapshot: Any) -> None:
        """The trainer's weights after ``version`` rollout batches (called after each update)."""
        self.versions.publish(version, snapshot)

    def pending(self, consumed: int) -> tuple[list[RolloutBatch], list[dict[str, int]]]:
        """What a checkpoint taken after ``consumed`` trained batches must hold: the batches ``consumed ..
        consumed + K - 1`` (their versions are older than the checkpoint's weights; waited for) and the positions
        in the prompt order before each of them and after the last. If the producer failed or was stopped, the
        batches it finished (the rest is generated again, from the checkpoint's weights)."""
        end = consumed + self.max_staleness
        with self._cond:
            with contextlib.suppress(BaseException):
                self._wait(lambda: self._next >= end)
            last = min(self._next, end)
            batches = [self._ready[i] for i in range(consumed, last)]
            return batches, [dict(self._positions[i]) for i in range(consumed, last + 1)]

    @contextlib.contextmanager
    def engine(self) -> Iterator[None]:
        """Borrow the engine between two batches (held-out evaluation loads the newest weights into it); the
        producer loads its own version again before its next batch."""
        with self._engine_lock:
            try:
                yield
            finally:
                self._loaded = None

    def close(self) -> None:
        """Stop the producer after the batch it is generating; batches not taken are dropped."""
        self.versions.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
