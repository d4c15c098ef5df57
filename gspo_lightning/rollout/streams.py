"""The data module's dataloaders (endless rollout batches; held-out results) and its prompt-set fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.rollout.evaluation import EvalResult


def identity(x: Any) -> Any:
    return x


def prompt_fingerprint(prompts: list[EncodedPrompt]) -> dict[str, Any]:
    """Count and SHA-256 (first 16 hex digits) of the prompts' indices, texts and answers, in order."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(f"{p.record.index}\x1f{p.record.text}\x1f{p.record.answer}\x1e".encode())
    return {"count": len(prompts), "sha256": digest.hexdigest()[:16]}


class RolloutStream(IterableDataset):
    """The training dataloader's dataset: the data module's next rollout batch, forever."""

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[RolloutBatch]:
        while True:
            yield self.datamodule.next_rollout()


class EvalStream(IterableDataset):
    """The validation dataloader's dataset: one held-out result per evaluation batch."""

    def __init__(self, datamodule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[EvalResult]:
        return self.datamodule.evaluate_heldout()
