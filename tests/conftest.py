"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import torch

from gspo_lightning import RolloutBatch


def make_batch(
    rewards: list[float],
    group_size: int,
    response_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    t: int = 4,
    prompt_width: int = 2,
) -> RolloutBatch:
    """A RolloutBatch of len(rewards) sequences in groups of ``group_size``, with dummy token ids."""
    n = len(rewards)
    mask = response_mask if response_mask is not None else torch.ones(n, t, dtype=torch.bool)
    t = mask.shape[1]
    return RolloutBatch(
        input_ids=torch.ones(n, prompt_width + t, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(n, prompt_width, dtype=torch.bool), mask.bool()], dim=1),
        response_mask=mask.bool(),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.arange(n) // group_size,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


import os  # noqa: E402

import pytest  # noqa: E402


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
    from gspo_lightning.data import AdditionTask
    from gspo_lightning.datamodule import RolloutDataModule

    dm = RolloutDataModule(
        prompts=AdditionTask(num_train=40, num_val=4), tokenizer=tiny_path, prompts_per_step=4, num_samples=4
    )
    dm.setup("fit")
    dm.bind_policy(tiny_model)
    torch.manual_seed(0)
    return dm.next_rollout()
