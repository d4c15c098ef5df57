"""The allocator setting: applied on glibc, skipped when the user opts out."""

import ctypes.util

import pytest

from gspo_lightning.allocator import fix_mmap_threshold


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to configure")
def test_the_threshold_is_fixed_on_glibc_and_the_opt_out_is_honoured(monkeypatch):
    monkeypatch.delenv("GSPO_LIGHTNING_MALLOC", raising=False)
    assert fix_mmap_threshold() is True
    monkeypatch.setenv("GSPO_LIGHTNING_MALLOC", "default")
    assert fix_mmap_threshold() is False
