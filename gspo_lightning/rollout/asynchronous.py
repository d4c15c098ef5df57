"""The data module's asynchronous side (``data.max_staleness > 0``): the engine's own copy of the policy, the
pipeline that fills it version by version (``rollout.pipeline``), and the in-flight batches a checkpoint keeps.

Why a copy: generation runs on a background thread while the trainer's optimizer changes the policy in place;
an engine generating with the live module (:class:`~gspo_lightning.engines.TransformersEngine`) would see its
weights change between decoding steps. So the engine is bound to a frozen copy, and each version is loaded into
it between two batches; engines that hold weights of their own (vLLM) are pushed from the copy the same way.
Snapshots hold the trainable parameters only (under LoRA, the adapters), on the CPU.

One random generator: transformers' ``generate`` samples from the process's generator (it takes no other), so
while a batch generates on the rollout thread nothing else may draw from it. Each batch's stream is seeded on that
thread under the engine's lock; held-out evaluations seed theirs under the same lock (:meth:`AsyncRollouts.hold`);
the update draws nothing (dropout off, refused otherwise; mini-batch shuffles use a generator of their own).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.engines.base import RolloutEngine
from gspo_lightning.models import has_dropout
from gspo_lightning.rollout.pipeline import RolloutPipeline
from gspo_lightning.sharding import is_sharded


def snapshot(policy: nn.Module) -> dict[str, Tensor]:
    """The policy's trainable parameters, copied to the CPU (what an update changes)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in policy.named_parameters() if p.requires_grad}


class PolicyCopy:
    """An eval-mode copy of the policy for the engine to generate with while the original trains (on ``device``:
    the policy's when None)."""

    def __init__(self, policy: nn.Module, device: str | None = None) -> None:
        if is_sharded(policy):
            raise ValueError(
                "data.max_staleness > 0 needs an unsharded policy on each rank (DDP): the engine's copy of a sharded"
                " policy would gather its weights with collectives on the rollout thread. Use strategy ddp, or"
                " data.max_staleness: 0."
            )
        # requires_grad stays as on the policy: generation runs under no_grad anyway, and some kernels take
        # another path for frozen weights (transformers' MoE experts do), which would change the log-probs' rounding
        self.model = copy.deepcopy(policy).eval()
        if device is not None:
            self.model.to(device)
        for module in self.model.modules():  # hooks are functions: deepcopy shares them, so they would record this
            for hooks in (module._forward_hooks, module._forward_pre_hooks):  # copy's forwards into the policy's
                hooks.clear()  # routing controller; the engine installs its own when it needs routes

    def load(self, state: dict[str, Tensor]) -> None:
        """Copy a :func:`snapshot` into the copy's parameters."""
        params = dict(self.model.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"the snapshot holds parameters the engine's copy lacks: {unknown[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


def batch_state(batch: RolloutBatch) -> dict[str, Any]:
    """A rollout batch as plain values (tensors, lists, numbers) for a checkpoint."""
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


class AsyncRollouts:
    """Owns the policy copy and the pipeline of one data module; see the module docstring.

    Args:
        max_staleness: K >= 1.
        engine: the data module's engine (bound to the copy, pushed from it).
    """

    def __init__(self, max_staleness: int, engine: RolloutEngine) -> None:
        every = getattr(engine, "sync_every", 1)
        if every != 1:
            raise ValueError(
                f"data.max_staleness={max_staleness} with the engine's sync_every={every}: the staleness bound already"
                " says how often the engine's weights may lag; set sync_every: 1."
            )
        self.max_staleness, self.engine = max_staleness, engine
        self.copy: PolicyCopy | None = None
        self.pipeline: RolloutPipeline | None = None
        self.pending: list[RolloutBatch] = []  # restored from a checkpoint, trained first
        self.positions: list[dict[str, int]] = []  # restored: the positions before each of them and after the last

    def bind(self, policy: nn.Module) -> None:
        """Bind the engine to a copy of ``policy``."""
        if has_dropout(policy):
            raise ValueError(
                "data.max_staleness > 0 with an active dropout in the policy: batches are sampled from the process's"
                " random generator on the rollout thread, which the update's dropout would draw from at the same"
                " time (runs would not reproduce); set model.policy.disable_dropout: true."
            )
        # an engine with weights of its own (vLLM) only reads the copy to push it: the copy can wait on the host
        self.copy = PolicyCopy(policy, None if self.engine.generates_with_policy else "cpu")
        self.engine.bind(self.copy.model)

    def _load(self, state: dict[str, Tensor]) -> None:
        self.copy.load(state)
        self.engine.sync_weights(self.copy.model)  # engines holding weights of their own copy them now

    @property
    def running(self) -> bool:
        return self.pipeline is not None

    def start(
        self,
        produce: Callable[[int], RolloutBatch],
        position: Callable[[], dict[str, int]],
        consumed: int,
        policy: nn.Module,
    ) -> None:
        """Start generating after batch ``consumed - 1`` and the restored in-flight batches, with ``policy``'s
        current weights as version ``consumed``; ``position()`` is where the prompt order stands now."""
        pending = {consumed + i: b for i, b in enumerate(self.pending)}
        positions = {consumed + i: p for i, p in enumerate(self.positions[: len(self.pending)])}
        self.pipeline = RolloutPipeline(produce, self._load, position, self.max_staleness, consumed, pending, positions)
        self.pending, self.positions = [], []
        self.pipeline.start(snapshot(policy))

    def take(self, index: int) -> RolloutBatch:
        """Batch ``index``, stamped with its staleness and the time the trainer waited for it."""
        batch, waited = self.pipeline.take(index)
        staleness = index - batch.policy_version
        batch.staleness = staleness
        batch.engine_is_policy = False  # sampled by the copy: its log-prob gap to the trainer is worth logging
        generated = batch.metrics.get("time/generate_s", 0.0) + batch.metrics.get("time/reward_s", 0.0)
        batch.metrics.update(
            {
                "rollout/staleness_mean": float(staleness.float().mean()),
                "rollout/staleness_max": float(staleness.max()),
                "time/wait_for_rollout_s": waited,
                "time/overlap_frac": max(0.0, 1.0 - waited / generated) if generated > 0 else 0.0,
            }
        )
        return batch

    def publish(self, version: int, policy: nn.Module) -> None:
        """The trainer's weights after ``version`` trained rollout batches (no-op before the pipeline starts)."""
        if self.pipeline is not None:
            self.pipeline.publish(version, snapshot(policy))

    @contextlib.contextmanager
    def hold(self, policy: nn.Module) -> Iterator[None]:
        """Hold the engine (and the random generator) between two batches, loaded with ``policy``'s current
        weights: held-out evaluation measures them."""
        borrow = self.pipeline.engine() if self.pipeline is not None else contextlib.nullcontext()
        with borrow:
            self._load(snapshot(policy))
            yield

    def state(self, consumed: int, position: dict[str, int]) -> tuple[dict[str, int], dict[str, Any] | None]:
        """For a checkpoint taken after ``consumed`` trained batches, with the prompt order at ``position`` (where
        the producer stands): the position before batch ``consumed``, and the batches in flight with the positions
        before each and after the last (None when none is in flight)."""
        if self.pipeline is not None:
            batches, positions = self.pipeline.pending(consumed)
        else:
            batches, positions = self.pending, [*self.positions[: len(self.pending)], position]
        if not batches:
            return positions[0], None
        return positions[0], {"batches": [batch_state(b) for b in batches], "positions": positions}

    def restore(self, in_flight: dict[str, Any] | None, before: dict[str, int]) -> dict[str, int]:
        """Take a checkpoint's batches in flight (trained next, in order); returns the position the producer goes
        on from (after them), ``before`` when none was in flight."""
        self.close()
        self.pending, self.positions = [], []
        if not in_flight:
            return before
        self.pending = [RolloutBatch(**b) for b in in_flight["batches"]]
        self.positions = [dict(p) for p in in_flight["positions"]]
        return self.positions[-1]

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
