"""`GSPOModule`: the LightningModule that turns rollout batches into policy updates.

Per rollout batch (ALGORITHMS.md, "How the pieces meet"): one no-grad pass for pi_old log-probs (skipped
when exactly on-policy), reference log-probs when a KL term or the advantage needs them, the advantages,
then ``epochs`` x ``mini_batches`` optimizer steps, each accumulating gradients over micro-batches whose
losses are normalised by the mini-batch's *global* counts (all micro-batches of all ranks), so the update
equals the whole-batch formula. Finally the new weights go back to the rollout engine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.advantage import Advantage, GroupNormAdvantage
from gspo_lightning.components.aggregation import AggregationMode, LossCounts, aggregate, masked_metric_mean
from gspo_lightning.components.clip import Clip, PPOClip
from gspo_lightning.components.kl import K3KL, KL
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.components.objective import PolicyObjective
from gspo_lightning.components.ratio import Ratio, SequenceRatio
from gspo_lightning.datamodule_utils import rollout_datamodule
from gspo_lightning.distributed import (
    clip_and_norm,
    data_parallel_mesh,
    full_policy_state_dict,
    global_counts,
    no_backward_sync,
    shard_fsdp2,
)
from gspo_lightning.logprobs import response_logprobs
from gspo_lightning.models import DType, load_causal_lm
from gspo_lightning.moe import moe_layout, router_stats
from gspo_lightning.ops import seq_sum
from gspo_lightning.routing import RoutingController, routing_change_frac
from gspo_lightning.training import (
    MetricAccumulator,
    correct_mismatch,
    eval_metrics,
    mini_batch_indices,
    restore_rng_states,
    rng_states,
    step_metrics,
)

OldLogprobs = Literal["auto", "recompute", "rollout"]


class GSPOModule(pl.LightningModule):
    """GSPO (and GRPO, Dr. GRPO, DAPO, ...) policy optimisation of a causal LM.

    The defaults are GSPO as published (arXiv 2507.18071): sequence ratio, group-normalised advantage,
    clip 3e-4/4e-4, seq-mean-token-mean, 4 mini-batches per rollout batch, no KL.

    Args:
        model: policy to load with ``from_pretrained``: local folder, hub id, or ``builtin:<name>``.
        trust_remote_code: allow custom model code from the hub (off unless asked).
        dtype: weights dtype at load time (use the Trainer's ``precision`` for mixed precision).
        attn_implementation: e.g. ``"sdpa"`` or ``"flash_attention_2"``; None lets transformers choose.
        gradient_checkpointing: recompute activations in backward to save memory.
        ratio: importance ratio (default ``SequenceRatio()``).
        advantage: advantage estimator (default ``GroupNormAdvantage()``).
        clip: surrogate (default ``PPOClip(3e-4, 4e-4)``).
        kl: KL estimator (default ``K3KL()`` when ``kl_coef > 0``).
        kl_coef: beta; 0 means no reference model is loaded or run.
        kl_in_reward: subtract ``kl_coef * sum_t kl(old, ref)`` from each reward instead of adding the KL
            term to the loss.
        aggregation: how per-token losses become a scalar.
        mini_batches: optimizer steps per rollout batch and epoch (the rollout batch is split this way).
        epochs: passes over each rollout batch.
        micro_batch_size: sequences per forward/backward (gradient accumulation); None = whole mini-batch.
        entropy_coef: weight of an entropy bonus (subtracted from the loss).
        router_aux_loss_coef: weight of an MoE model's load-balancing loss (0 = off).
        temperature: the sampling temperature, so log-probs match the sampled distribution (linked).
        max_new_tokens: the generation limit, ``T_max`` of ``seq-mean-token-sum-norm`` (linked).
        old_logprobs: ``"auto"`` skips the pi_old pass when exactly on-policy (1 mini-batch, 1 epoch: then
            pi_old = pi_theta); ``"recompute"`` always runs it; ``"rollout"`` uses the engine's log-probs as
            pi_old and skips the pass (the GSPO paper notes its sequence ratio tolerates the mismatch).
        mismatch_correction: importance-sampling correction of the rollout engine's log-probs against the
            trainer's (``MismatchCorrection``: truncated or masked, token or sequence level); each token's
            loss is multiplied by its weight. Needs an engine that reports log-probs.
        max_grad_norm: gradient clipping by global norm (None: no clipping; the norm is logged anyway).
        optimizer: optimizer factory (default ``AdamW(lr=1e-6, weight_decay=0.0)``).
        lr_scheduler: scheduler factory, stepped once per optimizer step (default: constant).
        shuffle_mini_batches: shuffle sequences before splitting into mini-batches.
        routing_replay: MoE Routing Replay (GSPO paper §5.3): record the experts pi_old chose for every token
            and force them in the training forwards of that rollout batch. Off by default; any ratio.
        track_routing_change: log ``moe/routing_change_frac``, the fraction of (response token, MoE layer)
            pairs whose top-k experts changed between pi_old and the current policy (needs the pi_old pass,
            so it is measured when the update is not exactly on-policy, or with replay).
        fsdp_mixed_precision: under ``ModelParallelStrategy`` (FSDP2): bfloat16 compute, float32 reduction.
        fsdp_cpu_offload: under FSDP2: keep parameters and optimizer state on the CPU.
    """

    def __init__(
        self,
        model: str = "builtin:tiny-qwen3-moe-addition",
        trust_remote_code: bool = False,
        dtype: DType = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
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
        entropy_coef: float = 0.0,
        router_aux_loss_coef: float = 0.0,
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        old_logprobs: OldLogprobs = "auto",
        mismatch_correction: MismatchCorrection | None = None,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        shuffle_mini_batches: bool = True,
        routing_replay: bool = False,
        track_routing_change: bool = True,
        fsdp_mixed_precision: bool = False,
        fsdp_cpu_offload: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["ratio", "advantage", "clip", "kl", "optimizer", "lr_scheduler", "mismatch_correction"]
        )
        if mini_batches < 1 or epochs < 1:
            raise ValueError(f"mini_batches and epochs must be >= 1, got {mini_batches} and {epochs}.")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}.")
        if kl is None and kl_coef > 0:
            kl = K3KL()
        self.automatic_optimization = False
        self.model_name = model
        self.advantage = advantage or GroupNormAdvantage()
        self.objective = PolicyObjective(
            ratio=ratio or SequenceRatio(),
            clip=clip or PPOClip(3e-4, 4e-4),
            kl=kl,
            kl_coef=0.0 if kl_in_reward else kl_coef,
            aggregation=aggregation,
            max_len=max_new_tokens,
        )
        self.kl_coef = kl_coef
        self.kl_in_reward = kl_in_reward
        self.mini_batches = mini_batches
        self.epochs = epochs
        self.micro_batch_size = micro_batch_size
        self.entropy_coef = entropy_coef
        self.router_aux_loss_coef = router_aux_loss_coef
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.old_logprobs_mode = old_logprobs
        self.mismatch_correction = mismatch_correction
        if old_logprobs == "rollout" and mismatch_correction is not None:
            raise ValueError("old_logprobs='rollout' makes pi_old the engine's: there is no mismatch to correct.")
        self.max_grad_norm = max_grad_norm
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.shuffle_mini_batches = shuffle_mini_batches
        self.routing_replay = routing_replay
        self.track_routing_change = track_routing_change
        self.routing: RoutingController | None = None
        self.collect_router_stats = False  # switched on by the MoE monitor callback
        self.moe_stats: dict[str, Tensor] = {}
        self.last_batch: RolloutBatch | None = None
        self.policy: torch.nn.Module | None = None
        self._reference: list[torch.nn.Module] = []  # a list keeps it out of state_dict, DDP and optimizers

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0 or self.advantage.needs_ref

    @property
    def on_policy(self) -> bool:
        """pi_old equals pi_theta for the only update: one mini-batch, one epoch."""
        return self.mini_batches == 1 and self.epochs == 1 and self.old_logprobs_mode == "auto"

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = load_causal_lm(hp.model, hp.dtype, hp.trust_remote_code, hp.attn_implementation)
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy.config.use_cache = False
        self.policy.train()  # from_pretrained returns eval mode
        self.moe = moe_layout(self.policy.config)
        if self.router_aux_loss_coef > 0 and self.moe is None:
            raise ValueError("router_aux_loss_coef > 0, but the model is not a mixture of experts.")
        if self.routing_replay and self.moe is None:
            raise ValueError("routing_replay=True, but the model is not a mixture of experts.")
        if self.moe is not None and (self.routing_replay or self.track_routing_change):
            self.routing = RoutingController(self.policy)
        if self.needs_reference and not self._reference:
            ref = load_causal_lm(hp.model, hp.dtype, hp.trust_remote_code, hp.attn_implementation)
            self._reference.append(ref.eval().requires_grad_(False))
        mesh = data_parallel_mesh(self._trainer, lambda: self.device_mesh)
        if mesh is not None:
            shard_fsdp2(self.policy, mesh, hp.fsdp_mixed_precision, hp.fsdp_cpu_offload)
            if self.reference is not None:
                shard_fsdp2(self.reference, mesh, hp.fsdp_mixed_precision, hp.fsdp_cpu_offload)

    @property
    def reference(self) -> torch.nn.Module | None:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        self._datamodule().bind_policy(self.policy)
        if self.reference is not None:
            self.reference.to(self.device)

    def on_validation_start(self) -> None:
        self._datamodule().bind_policy(self.policy)

    def _datamodule(self):
        return rollout_datamodule(self.trainer)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer)}}

    def _forward(self, batch: RolloutBatch, model: torch.nn.Module, with_entropy: bool = False, router: bool = False):
        return response_logprobs(
            model,
            batch.input_ids,
            batch.attention_mask,
            batch.response_mask.shape[1],
            temperature=self.temperature,
            with_entropy=with_entropy,
            entropy_grad=self.entropy_coef > 0,
            output_router_logits=router,
        )

    def _micro_batches(self, index: Tensor) -> list[Tensor]:
        size = self.micro_batch_size or len(index)
        return list(torch.split(index, size))

    @torch.no_grad()
    def _no_grad_logprobs(self, batch: RolloutBatch, model: torch.nn.Module, record: bool = False) -> Tensor:
        """Log-probs in eval mode, micro-batch by micro-batch; with ``record``, pi_old's experts go to
        ``batch.routing``."""
        was_training = model.training
        model.eval()
        parts, routing = [], []
        try:
            for index in self._micro_batches(torch.arange(len(batch))):
                micro = batch.select(index)
                with self.routing.recording(micro.input_ids) if record else nullcontext():
                    parts.append(self._forward(micro, model).logprobs)
                if record:
                    routing.append(self.routing.recorded())
        finally:
            model.train(was_training)
        if record:
            batch.routing = torch.cat(routing)
        return torch.cat(parts)

    def prepare_batch(self, batch: RolloutBatch) -> RolloutBatch:
        """Fill in pi_old and reference log-probs, apply KL-in-reward, compute the advantages."""
        start = time.perf_counter()
        record = self.routing is not None and (self.routing_replay or not self.on_policy)
        if self.old_logprobs_mode == "rollout":
            if batch.rollout_logprobs is None:
                raise ValueError("old_logprobs='rollout' needs an engine that reports log-probs (e.g. VLLMEngine).")
            if record:
                self._no_grad_logprobs(batch, self.policy, record=True)
            batch.old_logprobs = batch.rollout_logprobs
        elif not self.on_policy or self.kl_in_reward or self.mismatch_correction is not None:
            batch.old_logprobs = self._no_grad_logprobs(batch, self.policy, record=record)
        elif record:  # replay needs pi_old's experts; on-policy, pi_old's log-probs are the training ones
            self._no_grad_logprobs(batch, self.policy, record=True)
        batch.metrics["time/old_logprob_s"] = time.perf_counter() - start
        if self.old_logprobs_mode != "rollout":
            correct_mismatch(batch, self.mismatch_correction)
        start = time.perf_counter()
        if self.reference is not None:
            batch.ref_logprobs = self._no_grad_logprobs(batch, self.reference)
        batch.metrics["time/ref_logprob_s"] = time.perf_counter() - start
        if self.kl_in_reward and self.objective.kl is not None:
            mask = batch.response_mask
            kl = self.objective.kl(batch.old_logprobs.masked_fill(~mask, 0), batch.ref_logprobs.masked_fill(~mask, 0))
            batch.metrics["rollout/kl_penalty_mean"] = (self.kl_coef * seq_sum(kl, mask)).mean().item()
            batch.rewards = batch.rewards - self.kl_coef * seq_sum(kl, mask)
        batch.advantages = self.advantage(batch)
        return batch

    def training_step(self, dataloader_iter: Iterator) -> None:
        # Pull the batch here (not prefetched): generation must see the weights after the previous step.
        batch, _, _ = next(dataloader_iter)
        start = time.perf_counter()
        batch = self.prepare_batch(batch.to(self.device))
        self.last_batch = batch
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        metrics = MetricAccumulator()
        world = self.trainer.world_size
        generator = torch.Generator().manual_seed(int(self.global_step))
        for _ in range(self.epochs):
            for index in mini_batch_indices(len(batch), self.mini_batches, self.shuffle_mini_batches, generator):
                mini = batch.select(index)
                counts = global_counts(self.trainer.strategy, mini.response_mask, self.device)
                optimizer.zero_grad(set_to_none=True)
                micro = self._micro_batches(torch.arange(len(mini)))
                for j, micro_index in enumerate(micro):
                    sync = nullcontext() if j == len(micro) - 1 else no_backward_sync(self.trainer.strategy)
                    part = mini.select(micro_index)
                    # the routing context spans backward too: gradient checkpointing re-runs the routers
                    with sync, self._routing_context(part):
                        loss, step_metrics = self._micro_step(part, counts)
                        # data-parallel strategies average gradients over ranks; the counts are global
                        self.manual_backward(loss * world)
                    metrics.add(step_metrics, weight=len(micro_index))
                grad_norm = self._clip_and_norm()
                optimizer.step()
                if isinstance(self.trainer.strategy, DeepSpeedStrategy):
                    grad_norm = torch.as_tensor(float(self.trainer.model.get_global_grad_norm() or 0.0))
                metrics.add({"policy/grad_norm": grad_norm}, weight=1)
                if scheduler is not None:
                    scheduler.step()
        self._datamodule().sync_weights(self.policy)
        train_s = time.perf_counter() - start
        self._log_step(batch, metrics.means(), train_s)

    def _routing_context(self, micro: RolloutBatch):
        """Record (or, with replay, force) pi_old's experts in forwards and backwards on ``micro``."""
        return RoutingController.context(self.routing, micro.input_ids, micro.routing, self.routing_replay)

    def _micro_step(self, micro: RolloutBatch, counts: LossCounts) -> tuple[Tensor, dict[str, Tensor]]:
        want_router = self.moe is not None and (self.router_aux_loss_coef > 0 or self.collect_router_stats)
        out = self._forward(micro, self.policy, with_entropy=True, router=want_router)
        old = micro.old_logprobs if micro.old_logprobs is not None else out.logprobs.detach()
        result = self.objective(
            out.logprobs, old, micro.advantages, micro.response_mask, micro.ref_logprobs, counts, micro.is_weights
        )
        loss = result.loss
        metrics = dict(result.metrics)
        mask = micro.response_mask
        metrics["policy/entropy"] = masked_metric_mean(out.entropy, mask)
        if self.entropy_coef > 0:
            loss = loss - self.entropy_coef * aggregate(
                out.entropy, mask, self.objective.aggregation, counts, self.max_new_tokens
            )
        if want_router and out.router_logits:
            if self.router_aux_loss_coef > 0:
                aux = out.aux_loss
                loss = loss + self.router_aux_loss_coef * aux * len(micro) / max(counts.num_seqs, 1.0)
                metrics["moe/aux_loss"] = aux.detach().float()
            if self.collect_router_stats:
                self.moe_stats = router_stats(out.router_logits, micro.attention_mask, self.moe[1])
        if self.routing is not None and micro.routing is not None and self.routing.mode != "off":
            current = self.routing.recorded()
            metrics["moe/routing_change_frac"] = routing_change_frac(micro.routing, current, micro.response_mask)
        metrics["policy/loss"] = loss.detach().float()
        return loss, metrics

    def _clip_and_norm(self) -> Tensor:
        return clip_and_norm(self.trainer, self.policy, self.max_grad_norm)

    def full_policy_state_dict(self) -> dict[str, Tensor]:
        """The policy's full weights on the CPU, gathered from whatever shards them (a collective)."""
        return full_policy_state_dict(self.trainer, self.policy)

    def _log_step(self, batch: RolloutBatch, policy_metrics: dict[str, Tensor], train_s: float) -> None:
        lr = self.optimizers().param_groups[0]["lr"]
        logged = step_metrics(batch, policy_metrics, train_s, lr)
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=len(batch))
        self.log("reward", logged["rollout/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch))

    def validation_step(self, result, batch_idx: int = 0) -> None:
        metrics = eval_metrics(result)
        self.log_dict(metrics, batch_size=len(result), sync_dist=True)
        self.log("val_acc", metrics["val/accuracy"], prog_bar=True, logger=False, batch_size=len(result))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("rng_states"):
            restore_rng_states(checkpoint["rng_states"])
