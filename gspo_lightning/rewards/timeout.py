"""Time-limited calls: a worker thread of its own that runs calls in order, so a caller can stop waiting.

A reward given ``timeout_s`` (:class:`~gspo_lightning.rewards.base.Reward`) submits each call to a
:class:`Worker` and waits at most that long for the result. A Python thread cannot be stopped, so a call that
overruns keeps its daemon thread (which never keeps the process alive) and the caller starts a new worker.
:func:`as_caller` carries the calling thread's grad mode and CUDA device, both per thread, over to the worker.
"""

from __future__ import annotations

import math
import numbers
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

import torch


def check_timeout(timeout_s: float | None) -> float | None:
    """``timeout_s`` as a float, validated: None (no limit) or a finite number of seconds > 0."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise ValueError(
            f"timeout_s must be a number of seconds > 0 (or None for no limit), got {timeout_s!r}; e.g. timeout_s: 60."
        )
    return float(timeout_s)


def _serve(jobs: queue.SimpleQueue) -> None:
    """A worker thread's loop: run ``(future, fn, args)`` jobs in order until a None arrives."""
    while (job := jobs.get()) is not None:
        future, fn, args = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, as concurrent.futures does
                future.set_exception(e)


class Worker:
    """One daemon thread running submitted calls in order, stopped when this object is garbage collected.

    Unlike a ``ThreadPoolExecutor``, whose threads the interpreter joins at exit, a call stuck here never keeps
    the process alive.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(self._jobs,), name=name, daemon=True)
        self.thread.start()
        # stop the thread when this worker is dropped, but not at exit: a thread woken during interpreter
        # shutdown that runs torch code aborts the process
        weakref.finalize(self, self._jobs.put, None).atexit = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its result (or exception) arrives in the returned future."""
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future


def as_caller(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` wrapped to run under the calling thread's grad mode and CUDA device (both are per thread)."""
    grad = torch.is_grad_enabled()
    on_device = torch.cuda.device(torch.cuda.current_device()) if torch.cuda.is_initialized() else nullcontext()

    def run(*args: Any) -> Any:
        with torch.set_grad_enabled(grad), on_device:
            return fn(*args)

    return run
