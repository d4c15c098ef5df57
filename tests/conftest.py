"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Built-in demo models are built into a per-session cache unless GSPO_LIGHTNING_CACHE is set."""
    if "GSPO_LIGHTNING_CACHE" not in os.environ:
        os.environ["GSPO_LIGHTNING_CACHE"] = str(tmp_path_factory.mktemp("gspo_cache"))
    yield


TINY = "builtin:tiny-qwen3-moe-random"


@pytest.fixture(scope="session")
def tiny_path():
    """Folder of the tiny random Qwen3-MoE (with its character tokenizer)."""
    from gspo_lightning.models import resolve_pretrained

    return resolve_pretrained(TINY)


@pytest.fixture()
def tiny_model(tiny_path):
    from gspo_lightning.models import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(tiny_path)


@pytest.fixture()
def tiny_tokenizer(tiny_path):
    from gspo_lightning.models import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture()
def rollout(tiny_path, tiny_model):
    """One rollout batch of 4 addition prompts x 4 samples from the tiny random MoE."""
    from support import addition_datamodule

    from gspo_lightning.rollout import PolicyLink

    dm = addition_datamodule(tiny_path)
    dm.connect(PolicyLink(tiny_model))
    torch.manual_seed(0)
    return dm.next_rollout()
