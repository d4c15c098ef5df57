"""Talking to one ``vllm serve`` process over HTTP: bounded retries, timeouts, one clear error.

A server that is down, slow or restarted never hangs a run and never lets a request or a weight push be skipped
silently: each call is tried ``retries + 1`` times with a growing pause (connection errors, timeouts and 5xx
answers), then :class:`ServerError` names the server, the route, what went wrong and what to check.
"""

from __future__ import annotations

import time
from typing import Any

import requests


class ServerError(RuntimeError):
    """A vLLM server did not answer a call after the retries (or answered it with an error)."""


class ServerClient:
    """One server's base URL and how patiently to call it.

    Args:
        url: e.g. ``http://127.0.0.1:8000``.
        timeout_s: limit on one call (generation of a whole request included).
        retries: further tries after a failed call (connection refused, timeout, 5xx).
        retry_wait_s: pause before the first retry, doubled before each next one.
        log: the server's log file, named in errors (servers the engine started), or None.
    """

    def __init__(
        self, url: str, timeout_s: float = 600.0, retries: int = 3, retry_wait_s: float = 1.0, log: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s, self.retries, self.retry_wait_s, self.log = timeout_s, retries, retry_wait_s, log
        self.session = requests.Session()
        self.requests = 0  # calls made (each retried call counts once)

    def call(self, route: str, payload: dict[str, Any] | None = None, method: str = "POST") -> Any:
        """``method route`` with a JSON body; the answer (JSON, else its text; None when empty). Raises
        :class:`ServerError`."""
        self.requests += 1
        wait, error = self.retry_wait_s, ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            try:
                answer = self.session.request(method, self.url + route, json=payload, timeout=self.timeout_s)
            except requests.Timeout:
                error = f"no answer within {self.timeout_s:g} s"
                continue
            except requests.ConnectionError as err:
                error = f"connection failed ({type(err).__name__})"
                continue
            if answer.status_code >= 500:
                error = f"HTTP {answer.status_code}: {answer.text[:300]}"
                continue
            if answer.status_code >= 400:
                raise ServerError(self._message(route, f"HTTP {answer.status_code}: {answer.text[:300]}", 1))
            if not answer.content:
                return None
            try:
                return answer.json()
            except ValueError:  # some routes answer plain text (/v1/load_lora_adapter)
                return answer.text
        raise ServerError(self._message(route, error, self.retries + 1))

    def _message(self, route: str, error: str, tries: int) -> str:
        where = f"; its log: {self.log}" if self.log else ""
        hint = (
            " (404: start it with VLLM_SERVER_DEV_MODE=1, --enable-scale-out and the worker extension, docs/vllm.md)"
            if error.startswith("HTTP 404")
            else ""
        )
        return f"vLLM server {self.url}{route} failed after {tries} tries: {error}{hint}{where}"

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 now (one try, short timeout)."""
        try:
            return self.session.get(self.url + "/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False
