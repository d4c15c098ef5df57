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
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from peft import PeftConfig
from typing_extensions import override

from gspo_lightning.adapters import AdapterDisabled, apply_peft, trainable, transformers_model
from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.advantage import Advantage, GroupNormAdvantage
from gspo_lightning.components.aggregation import AggregationMode
from gspo_lightning.components.clip import Clip, PPOClip
from gspo_lightning.components.kl import K3KL, KL
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.components.objective import PolicyObjective
from gspo_lightning.components.ratio import Ratio, SequenceRatio
from gspo_lightning.datamodule import rollout_datamodule
from gspo_lightning.evaluation import EvalResult, eval_metrics
from gspo_lightning.models import DType
from gspo_lightning.moe import RouterStats, moe_layout, routing_context
from gspo_lightning.sharding import shard_fsdp2
from gspo_lightning.training.guard import NonFiniteGuard
from gspo_lightning.training.logprobs import DEFAULT_CHUNK_SIZE
from gspo_lightning.training.metrics import MetricAccumulator, response_counts, step_metrics
from gspo_lightning.training.optim import build_optimizers
from gspo_lightning.training.policy import (
    CHECKED_OPTIONS,
    check_options,
    load_policy,
    load_reference,
    replay_mode,
    routing_controller,
    set_dropout_to_zero,
    shard_from_rank0,
)
from gspo_lightning.training.pre_update import OldLogprobs, PreUpdatePass, ReplayMode, is_on_policy
from gspo_lightning.training.splits import micro_batches, mini_batch_indices
from gspo_lightning.training.strategy import StrategyAdapter
from gspo_lightning.training.update import PolicyLoss


class GSPOModule(pl.LightningModule):
    """GSPO (and GRPO, Dr. GRPO, DAPO, ...) policy optimisation of a causal LM.

    The defaults are GSPO as published (arXiv 2507.18071): sequence ratio, group-normalised advantage,
    clip 3e-4/4e-4, seq-mean-token-mean, 4 mini-batches per rollout batch, no KL. Where this module departs
    from the paper, on purpose (docs/algorithms.md, "Deviations from the GSPO paper"):

    - exactly on-policy (1 mini-batch, 1 epoch, ``old_logprobs: auto``) the pi_old pass is skipped: pi_old is
      pi_theta, detached, so every ratio is exactly 1;
    - pi_old and the reference are evaluated in eval mode (no dropout), the update in train mode;
    - logits are divided by the sampling temperature, so log-probs describe the distribution sampled from;
    - optional terms the paper does not have: an entropy bonus (``entropy_coef``), an MoE load-balancing
      loss (``router_aux_loss_coef``), a KL penalty in the loss or in the reward, rollout/trainer mismatch
      weights (``mismatch_correction``), Routing Replay (``routing_replay``, the paper's GRPO baseline aid);
    - log-ratios are clamped before ``exp`` (a safety cut-off, ``components.clip``).

    Args (one line each; the README and docs/algorithms.md say more):
        model: policy to load with ``from_pretrained``: local folder, hub id, or ``builtin:<name>``.
        trust_remote_code / dtype / attn_implementation: ``from_pretrained`` options (dtype at load time).
        gradient_checkpointing: recompute activations in backward to save memory.
        disable_dropout: set the policy's dropout to 0, so the ratio is 1 at identical weights (as TRL).
        ratio / advantage / clip: default ``SequenceRatio``, ``GroupNormAdvantage``, ``PPOClip(3e-4, 4e-4)``.
        kl: KL estimator (default ``K3KL()`` when ``kl_coef > 0``); kl_coef: beta, 0 loads no reference model.
        kl_in_reward: subtract ``kl_coef * sum_t kl(old, ref)`` from each reward instead of a loss term.
        aggregation: how per-token losses become a scalar.
        mini_batches / epochs: optimizer steps per rollout batch and epoch; passes over each rollout batch.
        micro_batch_size: sequences per forward/backward (gradient accumulation); None = whole mini-batch.
        micro_batch_tokens: instead, pack length-sorted sequences into micro-batches of at most this many
            tokens once padded to their longest, each trimmed to its own widths (less padding when lengths vary).
        logprob_chunk_size: response tokens per chunk of the output projection (O(chunk x V) memory); None: all.
        padding_free: forward each micro-batch's real tokens packed into one row, position ids restarting per
            sequence (block-causal attention): no compute on padding; results equal the padded path's.
        entropy_coef / router_aux_loss_coef: weights of the entropy bonus and of an MoE load-balancing loss.
        temperature / max_new_tokens: the sampling temperature and generation limit (T_max), linked from data.
        old_logprobs: ``"auto"`` skips the pi_old pass when exactly on-policy, ``"recompute"``, ``"rollout"``.
        mismatch_correction: rollout/trainer importance weights (``MismatchCorrection``) on each token's loss.
        max_grad_norm: gradient clipping by global norm (None: no clipping; the norm is logged anyway).
        max_nonfinite_steps: consecutive steps with a non-finite gradient (each skipped) that stop the run.
        optimizer / lr_scheduler: factories (default ``AdamW(lr=1e-6)``, constant), stepped per optimizer step.
        shuffle_mini_batches: shuffle sequences before splitting into mini-batches.
        routing_replay: MoE routing replay: ``"old"`` (or ``true``) forces pi_old's experts in the update forwards
            (Routing Replay, GSPO paper §5.3, "R2"); ``"rollout"`` forces the rollout engine's in every trainer
            forward of the batch (Rollout Routing Replay, arXiv 2510.11370, "R3"); ``"off"`` (or ``false``).
        track_routing_change: log ``moe/routing_change_frac`` (experts changed since pi_old).
        track_rollout_routing: ask the engine for its routes and log ``moe/rollout_routing_mismatch_frac`` even
            without ``routing_replay: rollout`` (which always logs it).
        fsdp_mixed_precision / fsdp_cpu_offload: FSDP2 options (bf16 compute with fp32 reduction; CPU offload).
        sync_every_micro_batch: reduce gradients across ranks after every micro-batch, not only a mini-batch's
            last; None: under sharded strategies (FSDP, FSDP2, ZeRO), which would otherwise hold every gradient
            unsharded until the last micro-batch (``StrategyAdapter.backward_sync``).
        peft: a ``peft`` config (e.g. ``peft.LoraConfig``): train adapters only; the reference is the policy with
            its adapters off (``adapters``).
    """

    def __init__(
        self,
        model: str = "builtin:tiny-qwen3-moe-addition",
        trust_remote_code: bool = False,
        dtype: DType = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        ratio: Ratio | None = None,
        advantage: Advantage | None = None,
        clip: Clip | None = None,
        kl: KL | None = None,
        kl_coef: float = 0.0,
        kl_in_reward: bool = False,
        aggregation: AggregationMode = "seq-mean-token-mean",
        mini_batches: int = 4,
        epochs: int = 1,
        micro_batch_size: int | None = None,
        micro_batch_tokens: int | None = None,
        logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        padding_free: bool = False,
        entropy_coef: float = 0.0,
        router_aux_loss_coef: float = 0.0,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        old_logprobs: OldLogprobs = "auto",
        mismatch_correction: MismatchCorrection | None = None,
        max_grad_norm: float | None = 1.0,
        max_nonfinite_steps: int = 3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        shuffle_mini_batches: bool = True,
        routing_replay: ReplayMode | bool = "off",
        track_routing_change: bool = True,
        track_rollout_routing: bool = False,
        fsdp_mixed_precision: bool = False,
        fsdp_cpu_offload: bool = False,
        sync_every_micro_batch: bool | None = None,
        peft: PeftConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["ratio", "advantage", "clip", "kl", "optimizer", "lr_scheduler", "mismatch_correction", "peft"]
        )
        self.peft_config = peft
        check_options(**{k: self.hparams[k] for k in CHECKED_OPTIONS})
        kl = K3KL() if kl is None and kl_coef > 0 else kl
        self.replay_mode = replay_mode(routing_replay)
        self.automatic_optimization = False
        self.advantage = advantage or GroupNormAdvantage()
        ratio, clip = ratio or SequenceRatio(), clip or PPOClip(3e-4, 4e-4)
        loss_kl_coef = 0.0 if kl_in_reward else kl_coef  # in the reward, the KL term is the pre-update pass's
        self.objective = PolicyObjective(ratio, clip, kl, loss_kl_coef, aggregation, max_len=max_new_tokens)
        self.policy_loss = PolicyLoss(
            self.objective, temperature, entropy_coef, router_aux_loss_coef, logprob_chunk_size, padding_free
        )
        on_policy = is_on_policy(mini_batches, epochs, old_logprobs)
        reward_kl = (kl, kl_coef) if kl_in_reward else (None, 0.0)
        self.pre_update = PreUpdatePass(
            self.advantage, old_logprobs, on_policy, *reward_kl, mismatch_correction, temperature, micro_batch_size,
            record_routing=self.replay_mode == "old" or not on_policy, chunk_size=logprob_chunk_size,
            micro_batch_tokens=micro_batch_tokens, padding_free=padding_free, routing_replay=self.replay_mode,
        )  # fmt: skip
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.policy: torch.nn.Module | None = None
        self.routing = None  # the policy's RoutingController (MoE models), set in configure_model
        self.moe = None  # the policy's MoELayout, or None for a dense model
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict, DDP and optimizers
        self._grad_norm, self._skip_step = torch.zeros(()), False  # set by on_before_optimizer_step
        self.nonfinite_guard = NonFiniteGuard(max_nonfinite_steps)

    @property
    def reference(self) -> torch.nn.Module | None:
        """The frozen reference model, loaded only when a KL term or the advantage needs it."""
        return self._reference[0] if self._reference else None

    @property
    def strategy_adapter(self) -> StrategyAdapter:
        return StrategyAdapter(self.trainer)

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        load = {k: hp[k] for k in ("model", "dtype", "trust_remote_code", "attn_implementation")}
        mesh = self.strategy_adapter.data_parallel_mesh(lambda: self.device_mesh) if self._trainer else None
        # FSDP2: every rank builds on the meta device, rank 0 alone loads the weights (with adapters, every rank
        # loads the frozen base: the adapters are created on top of real weights)
        empty = mesh is not None and self.peft_config is None
        options = {k: hp[k] for k in ("gradient_checkpointing", "disable_dropout")}
        self.policy = load_policy(**load, **options, empty=empty)
        if self.peft_config is not None:
            self.policy = apply_peft(self.policy, self.peft_config)
            if hp.disable_dropout:
                set_dropout_to_zero(self.policy)
        self.moe = moe_layout(self.policy.config)
        args = (self.replay_mode, hp.track_routing_change or hp.track_rollout_routing, hp.router_aux_loss_coef)
        self.routing = routing_controller(self.policy, self.moe, *args)
        if (hp.kl_coef > 0 or self.advantage.needs_ref) and not self._reference:
            reference = AdapterDisabled(self.policy) if self.peft_config is not None else None
            self._reference.append(reference or load_reference(**load, empty=empty))
        if self._trainer is not None:
            self.strategy_adapter.check_clipping(hp.max_grad_norm)
        if mesh is None:
            return
        fsdp = (hp.fsdp_mixed_precision, hp.fsdp_cpu_offload)
        if self.peft_config is not None:  # the reference is the policy itself
            # the root is the transformers model: generate() calls it directly, past the peft wrapper
            shard_fsdp2(transformers_model(self.policy).to(self.trainer.strategy.root_device), mesh, *fsdp)
            return
        for model in (self.policy, self.reference):
            if model is not None:
                shard_from_rank0(model, load, mesh, self.trainer.strategy.root_device, *fsdp)

    @property
    def wants_rollout_routes(self) -> bool:
        """Whether the rollout engine must report its MoE routes (Rollout Routing Replay or its metric)."""
        return self.replay_mode == "rollout" or self.hparams.track_rollout_routing

    @override
    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        if self.wants_rollout_routes:  # before the engine is bound: vLLM decides how to report routes at build
            rollout_datamodule(self.trainer).request_routes()

    @override
    def configure_optimizers(self) -> Any:
        params = trainable(self.policy.parameters())  # adapters only under peft
        return build_optimizers(params, self.optimizer_factory, self.lr_scheduler_factory)

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
        hp, adapter = self.hparams, self.strategy_adapter
        metrics, stats = MetricAccumulator(), RouterStats(self.moe.top_k) if self.moe is not None else None
        if stats is not None and prepared.rollout_mismatch is not None:
            stats.add_rollout_mismatch(*prepared.rollout_mismatch)
        generator = torch.Generator().manual_seed(int(self.global_step))
        skipped = 0
        for epoch in range(hp.epochs):
            for m, index in enumerate(
                mini_batch_indices(len(batch), hp.mini_batches, hp.shuffle_mini_batches, generator)
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
        rollout_datamodule(self.trainer).sync_weights(self.policy)
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
        micro = micro_batches(mini, self.hparams.micro_batch_size, self.hparams.micro_batch_tokens, self._agree)
        for j, (_, part) in enumerate(micro):
            # the routing context spans backward too: gradient checkpointing re-runs the routers
            last, every = j == len(micro) - 1, self.hparams.sync_every_micro_batch
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
        tokens_split = self.hparams.micro_batch_tokens is not None and self.trainer.world_size > 1
        return self.strategy_adapter.agree_max if tokens_split else None

    def routing_context(self, micro: RolloutBatch, observe: bool = False):
        """Record (or, with replay, force) the batch's experts in forwards and backwards on ``micro``; ``observe``:
        record the routers' choice even with nothing to compare it with but the engine's routes."""
        packed = micro.attention_mask if self.hparams.padding_free else None
        replay, observe = self.replay_mode != "off", observe and micro.rollout_routing is not None
        return routing_context(
            self.routing, micro.input_ids, micro.routing, replay, packed, micro.routing_mask, observe
        )

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this once the gradients are unscaled, whatever the precision plugin
        adapter = self.strategy_adapter
        self._grad_norm = adapter.clip_gradients(self.policy, self.hparams.max_grad_norm)
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
