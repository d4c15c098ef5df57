"""The ``lightning_log`` fixture: Lightning's log records, for tests of the lines a run prints."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture()
def lightning_log(caplog):
    """Lightning's log records (its logger does not propagate to the root logger caplog listens on)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)
