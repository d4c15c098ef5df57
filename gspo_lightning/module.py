"""`GSPOModule`: the LightningModule that turns rollout batches into policy updates.

Per rollout batch (docs/algorithms.md, "How the pieces meet"): the pre-update pass (``training.pre_update``:
pi_old, reference, KL in reward, mismatch weights, advantages), then ``epochs`` x ``mini_batches``
optimizer steps, each accumulating gradients over micro-batches whose losses are normalised by the
mini-batch's *global* counts (``training.update``), so the update equals the whole-batch formula under any
split and any number of ranks (``training.strategy``). Finally the new weights go back to the rollout engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftConfig
from typing_extensions import override

from gspo_lightning.adapters import trainable
from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.advantage import Advantage, GroupNormAdvantage
from gspo_lightning.components.clip import Clip, PPOClip
from gspo_lightning.components.kl import K3KL, KL
from gspo_lightning.components.masks import TokenMask
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.components.objective import PolicyObjective
from gspo_lightning.components.ratio import Ratio, SequenceRatio
from gspo_lightning.moe import RouterStats, routing_context
from gspo_lightning.rollout.evaluation import EvalResult, eval_metrics
from gspo_lightning.rollout.link import PolicyLink, rollout_side
from gspo_lightning.training.checkpoint_state import load_adapters_only, save_adapters_only
from gspo_lightning.training.guard import NonFiniteGuard
from gspo_lightning.training.metrics import MetricAccumulator, response_counts, step_metrics
from gspo_lightning.training.optim import build_optimizers
from gspo_lightning.training.options import (
    GROUPS,
    BatchingOptions,
    LossOptions,
    ModuleOptions,
    MoEOptions,
    PolicyOptions,
    ShardingOptions,
    UpdateOptions,
    check_aggregation,
    needs_reference,
)
from gspo_lightning.training.policy import build_models
from gspo_lightning.training.pre_update import PreUpdatePass
from gspo_lightning.training.splits import micro_batches, mini_batch_indices
from gspo_lightning.training.strategy import StrategyAdapter
from gspo_lightning.training.update import PolicyLoss

COMPONENTS = (
    "ratio", "advantage", "clip", "kl", "token_masks", "mismatch_correction", "optimizer", "lr_scheduler", "peft",
)  # fmt: skip
"""The module's component arguments (flat; the option groups are ``training.options.GROUPS``)."""


class GSPOModule(pl.LightningModule):
    """GSPO (and GRPO, Dr. GRPO, DAPO, ...) policy optimisation of a causal LM.

    The defaults are GSPO as published (arXiv 2507.18071): sequence ratio, group-normalised advantage,
    clip 3e-4/4e-4, seq-mean-token-mean, 4 mini-batches per rollout batch, no KL. Where this module departs
    from the paper, on purpose (docs/algorithms.md, "Deviations from the GSPO paper"):

    - exactly on-policy (1 mini-batch, 1 epoch, ``old_logprobs: auto``) the pi_old pass is skipped: pi_old is
      pi_theta, detached, so every ratio is exactly 1;
    - pi_old and the reference are evaluated in eval mode (no dropout), the update in train mode;
    - logits are divided by the sampling temperature, so log-probs describe the distribution sampled from;
    - optional terms the paper does not have: an entropy bonus, an MoE load-balancing loss, a KL penalty in the
      loss or in the reward, rollout/trainer mismatch weights, Routing Replay (the paper's GRPO baseline aid);
    - log-ratios are clamped before ``exp`` (a safety cut-off, ``components.clip``).

    Args:
        policy: the policy to train and how ``from_pretrained`` loads it.
        ratio: the importance ratio (default ``SequenceRatio``: GSPO's length-normalised sequence ratio).
        advantage: the advantage estimator (default ``GroupNormAdvantage``).
        clip: the clip (default ``PPOClip(3e-4, 4e-4)``, the GSPO paper's).
        kl: the KL estimator (default ``K3KL()`` when ``loss.kl_coef > 0``).
        token_masks: per-token weights on the policy loss: off-policy sequence masks, forking tokens, Clip-Cov and
            KL-Cov (``components.masks``); they compose with every objective and the mismatch correction.
        mismatch_correction: rollout/trainer importance weights on each token's loss (``MismatchCorrection``).
        loss: the aggregation, KL and entropy weights, and the sampling constants the log-probs follow.
        update: optimizer steps per rollout batch, pi_old's source, gradient clipping, non-finite guard.
        batching: micro-batches, token budgets, the chunked head, padding-free packing.
        moe: Routing Replay (R2, R3), routing metrics, the load-balancing loss.
        sharding: FSDP2 mixed precision and CPU offload, gradient sync per micro-batch.
        optimizer: optimizer factory (default ``AdamW(lr=1e-6)``), stepped per optimizer step.
        lr_scheduler: learning-rate scheduler factory (default: constant), stepped per optimizer step.
        peft: a ``peft`` config (e.g. ``peft.LoraConfig``): train adapters only; the reference is the policy with
            its adapters off.
    """

    def __init__(
        self,
        policy: PolicyOptions = PolicyOptions(),  # noqa: B008 - frozen dataclasses: a shared default is safe
        ratio: Ratio | None = None,
        advantage: Advantage | None = None,
        clip: Clip | None = None,
        kl: KL | None = None,
        token_masks: list[TokenMask] | None = None,
        mismatch_correction: MismatchCorrection | None = None,
        loss: LossOptions = LossOptions(),  # noqa: B008
        update: UpdateOptions = UpdateOptions(),  # noqa: B008
        batching: BatchingOptions = BatchingOptions(),  # noqa: B008
        moe: MoEOptions = MoEOptions(),  # noqa: B008
        sharding: ShardingOptions = ShardingOptions(),  # noqa: B008
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        peft: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.options = ModuleOptions(policy, loss, update, batching, moe, sharding)
        # logged by on_fit_start without TensorBoard's placeholder hp_metric (-1 on every run)
        self.save_hyperparameters(ignore=list(COMPONENTS), logger=False)
        for name in GROUPS:  # plain dicts, as the CLI stores them: checkpoints load without unpickling classes
            if is_dataclass(self.hparams.get(name)):
                self.hparams[name] = asdict(self.hparams[name])
        check_aggregation(loss)
        self.peft_config = peft
        self.automatic_optimization = False
        self.advantage = advantage or GroupNormAdvantage()
        kl = K3KL() if kl is None and loss.kl_coef > 0 else kl
        ratio, clip = ratio or SequenceRatio(), clip or PPOClip(3e-4, 4e-4)
        masks = list(token_masks or ())
        in_update = [m for m in masks if m.stage == "update"]
        self.objective = PolicyObjective(
            ratio, clip, kl, loss.loss_kl_coef, loss.aggregation, loss.max_new_tokens, in_update
        )  # fmt: skip
        self.policy_loss = PolicyLoss(self.objective, loss, batching, moe.router_aux_loss_coef)
        before = [m for m in masks if m.stage == "pre_update"]
        self.pre_update = PreUpdatePass(self.advantage, update, batching, loss, moe, kl, mismatch_correction, before)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.policy: torch.nn.Module | None = None
        self.routing = None  # the policy's RoutingController (MoE models), set in configure_model
        self.moe = None  # the policy's MoELayout, or None for a dense model
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict, DDP and optimizers
        self._grad_norm, self._skip_step = torch.zeros(()), False  # set by on_before_optimizer_step
        self.nonfinite_guard = NonFiniteGuard(update.max_nonfinite_steps)

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model, loaded only when a KL term or the advantage needs it."""
        return self._reference[0] if self._reference else None

    @property
    def strategy_adapter(self) -> StrategyAdapter:
        return StrategyAdapter(self.trainer)

    @override
    def configure_model(self) -> None:
        """Load (or, under FSDP2, build empty and shard) the policy and the reference, and connect the policy to
        the data side (``rollout.link``)."""
        if self.policy is None:
            self._build_models()
        if self._trainer is not None:
            rollout_side(self.trainer).connect(PolicyLink(self.policy, self.options.moe.wants_rollout_routes))

    def _build_models(self) -> None:
        here = "cuda" if torch.cuda.is_available() else "cpu"
        self.options.policy.check_device(self.trainer.strategy.root_device.type if self._trainer else here)
        mesh = self.strategy_adapter.data_parallel_mesh(lambda: self.device_mesh) if self._trainer else None
        device = self.trainer.strategy.root_device if mesh is not None else None
        models = build_models(self.options, self.peft_config, needs_reference(self.options.loss, self.advantage),
                              mesh, device)  # fmt: skip
        self.policy, self.moe, self.routing = models.policy, models.moe, models.routing
        if models.reference is not None and not self._reference:
            self._reference.append(models.reference)
        if self._trainer is not None:
            self.strategy_adapter.check_clipping(self.options.update.max_grad_norm)

    @override
    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        for logger in self.loggers:  # metrics={}: TensorBoard without its placeholder hp_metric
            kwargs = {"metrics": {}} if isinstance(logger, TensorBoardLogger) else {}
            logger.log_hyperparams(self.hparams, **kwargs)

    @override
    def configure_optimizers(self) -> Any:
        params = trainable(self.policy.parameters())  # adapters only under peft
        return build_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory)

    # under peft a checkpoint holds the adapters, not the frozen base: that comes from model.policy.path on load
    on_save_checkpoint = save_adapters_only
    on_load_checkpoint = load_adapters_only

    @override
    def training_step(self, dataloader_iter: Iterator) -> dict[str, Any]:
        """One rollout batch: pre-update pass, ``epochs`` x ``mini_batches`` optimizer steps, weight sync.

        Returns ``outputs`` for callbacks: ``batch`` (the prepared :class:`RolloutBatch`) and
        ``router_stats`` (a ``RouterStatsResult`` over every micro-batch, or None for a dense model).
        """
        # Pull the batch here (not prefetched): generation must see the weights after the previous step.
        batch, _, _ = next(dataloader_iter)
        start = time.perf_counter()
        batch = batch.to(self.device)
        prepared = self.pre_update(batch, self.policy, self.reference, self.routing, self._agree)
        batch = prepared.apply(batch)
        update, adapter = self.options.update, self.strategy_adapter
        metrics, stats = MetricAccumulator(), RouterStats(self.moe.top_k) if self.moe is not None else None
        if stats is not None and prepared.rollout_mismatch is not None:
            stats.add_rollout_mismatch(*prepared.rollout_mismatch)
        generator = torch.Generator().manual_seed(int(self.global_step))
        skipped = 0
        for epoch in range(update.epochs):
            for m, index in enumerate(
                mini_batch_indices(len(batch), update.mini_batches, update.shuffle_mini_batches, generator)
            ):
                # the first mini-batch runs on pi_old's weights: its routing cannot have moved yet, and it is where
                # the engine/trainer routing mismatch is measured when the pre-update pass ran no forward
                first = epoch + m == 0
                mismatch = first and prepared.rollout_mismatch is None
                skipped += self._update(batch.select(index), metrics, stats, not first, mismatch)
        if not adapter.weights_finite(self.policy):  # before any generation or checkpoint sees them
            raise RuntimeError(
                "An optimizer step made the policy's weights non-finite (is the learning rate too high?): stopping"
                " before they reach the rollout engine or a checkpoint; the checkpoints written so far are kept."
            )
        sync_start = time.perf_counter()
        if rollout_side(self.trainer).sync_weights(self.policy):  # engines generating with the policy copy nothing
            batch.metrics["time/weight_sync_s"] = time.perf_counter() - sync_start
        batch.metrics["policy/skipped_steps"] = float(skipped)
        router_stats = stats.result() if stats is not None else None
        if router_stats is not None and router_stats.rollout_mismatch is not None:
            batch.metrics["moe/rollout_routing_mismatch_frac"] = float(router_stats.rollout_mismatch.mean())
            batch.metrics["moe/rollout_routing_unrouted_frac"] = float(router_stats.rollout_unrouted_frac)
        self._log_step(batch, metrics.result(adapter.reduce), time.perf_counter() - start)
        return {"batch": batch, "router_stats": router_stats}

    def _update(
        self, mini: RolloutBatch, metrics: MetricAccumulator, stats, measure_routing: bool, measure_mismatch: bool
    ) -> bool:
        """One optimizer step on a mini-batch, accumulated over its micro-batches. Returns whether it was
        skipped (non-finite gradient)."""
        adapter, optimizer, scheduler = self.strategy_adapter, self.optimizers(), self.lr_schedulers()
        counts = adapter.global_counts(mini.response_mask)
        optimizer.zero_grad(set_to_none=True)
        batching = self.options.batching
        micro = micro_batches(mini, batching.micro_batch_size, batching.micro_batch_tokens, self._agree)
        for j, (_, part) in enumerate(micro):
            # the routing context spans backward too: gradient checkpointing re-runs the routers
            last, every = j == len(micro) - 1, self.options.sharding.sync_every_micro_batch
            with adapter.backward_sync(last, self.policy, every), self.routing_context(part, measure_mismatch):
                loss, part_metrics = self.policy_loss(
                    self.policy, part, counts, self.routing, stats, measure_routing, measure_mismatch
                )
                self.manual_backward(loss * adapter.loss_scale)
            metrics.add_micro_batch(part_metrics, *response_counts(part.response_mask))
        optimizer.step()  # clips, or drops a non-finite gradient, in on_before_optimizer_step
        metrics.end_step({"policy/grad_norm": adapter.grad_norm_after_step(self._grad_norm)})
        optimizer.zero_grad(set_to_none=True)  # the gradients' memory is free while the next rollout generates
        if scheduler is not None:
            scheduler.step()
        return self._skip_step

    @property
    def _agree(self):
        """Token-budget micro-batch counts differ between ranks: agree on the largest (forwards may be collectives)."""
        tokens_split = self.options.batching.micro_batch_tokens is not None and self.trainer.world_size > 1
        return self.strategy_adapter.agree_max if tokens_split else None

    def routing_context(self, micro: RolloutBatch, observe: bool = False):
        """Record (or, with replay, force) the batch's experts in forwards and backwards on ``micro``; ``observe``:
        record the routers' choice even with nothing to compare it with but the engine's routes."""
        packed = micro.attention_mask if self.options.batching.padding_free else None
        replay, observe = self.options.moe.replay != "off", observe and micro.rollout_routing is not None
        return routing_context(
            self.routing, micro.input_ids, micro.routing, replay, packed, micro.routing_mask, observe
        )

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this once the gradients are unscaled, whatever the precision plugin
        adapter = self.strategy_adapter
        self._grad_norm = adapter.clip_gradients(self.policy, self.options.update.max_grad_norm)
        self._skip_step = self.nonfinite_guard(self._grad_norm, adapter.nonfinite(self._grad_norm), self.policy)

    def _log_step(self, batch: RolloutBatch, policy_metrics: dict[str, float], train_s: float) -> None:
        lr = self.optimizers().param_groups[0]["lr"]
        logged = step_metrics(batch, policy_metrics, train_s, lr)
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log("reward", logged["rollout/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch))

    @override
    def validation_step(self, result: EvalResult, batch_idx: int = 0) -> None:
        metrics = eval_metrics(result)
        self.log_dict(metrics, batch_size=len(result), sync_dist=True)
        self.log("val_acc", metrics["val/accuracy"], prog_bar=True, logger=False, batch_size=len(result))
