"""The pre-update pass: everything computed once per rollout batch, without gradient, before any update.

In order (docs/algorithms.md, "How the pieces meet"): pi_old's log-probs (from one of the sources named by
:data:`OldLogprobSource`), pi_old's MoE routing when Routing Replay or the routing-change metric needs it,
the rollout/trainer mismatch weights, the reference model's log-probs, the KL penalty when it is applied in
the reward, and the advantages. :class:`PreUpdatePass` returns all of it as a :class:`PreUpdateResult`;
it never writes to the batch it is given.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.advantage import Advantage
from gspo_lightning.components.kl import KL
from gspo_lightning.components.masks import TokenMask, apply_masks
from gspo_lightning.components.mismatch import MismatchCorrection
from gspo_lightning.moe.routing import RoutingController, rollout_mismatch_counts, routing_context
from gspo_lightning.ops import seq_sum
from gspo_lightning.training.logprobs import DEFAULT_CHUNK_SIZE, response_logprobs
from gspo_lightning.training.options import BatchingOptions, LossOptions, MoEOptions, OldLogprobs, UpdateOptions
from gspo_lightning.training.splits import micro_batches

OldLogprobSource = Literal["trainer", "rollout", "none"]
"""Where pi_old comes from in a run: the trainer's own no-grad pass, the rollout engine's reported
log-probs, or nowhere (exactly on-policy: pi_old = pi_theta, and the update detaches its own log-probs)."""


def old_logprob_source(old_logprobs: OldLogprobs, on_policy: bool, needs_trainer_old: bool) -> OldLogprobSource:
    """Resolve ``model.update.old_logprobs`` for a run.

    - ``"rollout"``: the engine's log-probs stand in for pi_old, whatever else holds.
    - ``"recompute"``: always the trainer's pass.
    - ``"auto"``: the trainer's pass when the update is off-policy or something else reads the trainer's
      pi_old (``needs_trainer_old``: the KL penalty in the reward, the mismatch correction); otherwise none.
    """
    if old_logprobs == "rollout":
        return "rollout"
    if old_logprobs == "recompute" or not on_policy or needs_trainer_old:
        return "trainer"
    return "none"


class NoGradPass(NamedTuple):
    """What :func:`no_grad_logprobs` returns."""

    logprobs: Tensor
    experts: Tensor | None = None
    entropy: Tensor | None = None


@torch.no_grad()
def no_grad_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    temperature: float,
    micro_batch_size: int | None,
    routing: RoutingController | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    micro_batch_tokens: int | None = None,
    agree: Callable[[int], int] | None = None,
    padding_free: bool = False,
    replay: bool = False,
    with_entropy: bool = False,
) -> NoGradPass:
    """Log-probs of the batch's responses in eval mode (no dropout), one micro-batch at a time.

    Micro-batches are cut as in the update (``training.splits.micro_batches``: by sequence count or token
    budget, each trimmed to its own widths) and their results put back in the batch's order and widths.
    With ``routing`` the routers' choices are recorded; with ``replay`` too, the batch's ``routing`` is forced
    (at ``routing_mask``) while the routers' own choices are still read.

    Returns:
        (N, T) log-probs, with ``routing`` the (N, L, P+T, k) experts the routers chose (else None), and with
        ``with_entropy`` the (N, T) entropies (else None).
    """
    was_training = model.training
    model.eval()
    n, t = batch.response_mask.shape
    logprobs = batch.response_mask.new_zeros(n, t, dtype=torch.float32)
    entropy = torch.zeros_like(logprobs) if with_entropy else None
    recorded = []
    try:
        for index, micro in micro_batches(batch, micro_batch_size, micro_batch_tokens, agree):
            width = micro.response_mask.shape[1]
            packed = micro.attention_mask if padding_free else None
            with routing_context(routing, micro.input_ids, micro.routing, replay, packed, micro.routing_mask, True):
                out = response_logprobs(
                    model, micro.input_ids, micro.attention_mask, width, temperature, chunk_size=chunk_size,
                    padding_free=padding_free, with_entropy=with_entropy, loss_mask=micro.response_mask,
                )  # fmt: skip
            logprobs[index.to(logprobs.device), :width] = out.logprobs
            if entropy is not None:
                entropy[index.to(entropy.device), :width] = out.entropy.float()
            if routing is not None:
                recorded.append((index, batch.prompt_width - micro.prompt_width, routing.chosen()))
    finally:
        model.train(was_training)
    if routing is None:
        return NoGradPass(logprobs, None, entropy)
    dtype = torch.int16 if any(r.dtype == torch.int16 for *_, r in recorded) else torch.uint8
    shape = (n, routing.num_layers, batch.input_ids.shape[1], recorded[0][2].shape[-1])
    experts = torch.zeros(shape, dtype=dtype, device=recorded[0][2].device)
    for index, start, part in recorded:  # one step per micro-batch
        experts[index.to(experts.device), :, start : start + part.shape[2]] = part.to(dtype)
    return NoGradPass(logprobs, experts, entropy)


@dataclass
class PreUpdateResult:
    """What the pre-update pass computed for one rollout batch (see ``RolloutBatch`` for shapes).

    Attributes:
        advantages: (N,) or (N, T).
        old_logprobs: pi_old's log-probs, or None when the source is ``"none"``.
        ref_logprobs: the reference model's log-probs, or None without a reference model.
        routing: the experts the update replays or compares with: pi_old's (recorded here) or, with Rollout
            Routing Replay, the engine's; None when neither.
        routing_mask: the positions ``routing`` covers (Rollout Routing Replay: those the engine reported).
        rollout_mismatch: :func:`~gspo_lightning.moe.routing.rollout_mismatch_counts` of pi_old's routers
            against the engine's routes, when this pass ran them on a batch with engine routes; else None.
        is_weights: the mismatch correction's importance weights times the pre-update token masks' weights, or None.
        token_kl_coef: the pre-update token masks' ``|lp - old|`` penalty coefficients (KL-Cov), or None.
        penalised_rewards: rewards less the KL penalty, or None when the KL term is not in the reward.
        metrics: ``time/*``, ``sampling/*`` and ``rollout/kl_penalty_mean`` scalars.
    """

    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    routing: Tensor | None = None
    routing_mask: Tensor | None = None
    rollout_mismatch: tuple[Tensor, Tensor, Tensor] | None = None
    is_weights: Tensor | None = None
    token_kl_coef: Tensor | None = None
    penalised_rewards: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def apply(self, batch: RolloutBatch) -> RolloutBatch:
        """A copy of ``batch`` carrying these results (the batch itself is left as it is)."""
        return dataclasses.replace(
            batch,
            advantages=self.advantages,
            old_logprobs=self.old_logprobs,
            ref_logprobs=self.ref_logprobs,
            routing=self.routing,
            routing_mask=self.routing_mask,
            is_weights=self.is_weights,
            token_kl_coef=self.token_kl_coef,
            penalised_rewards=self.penalised_rewards,
            metrics={**batch.metrics, **self.metrics},
        )


class PreUpdatePass:
    """Computes a :class:`PreUpdateResult` per rollout batch.

    Args:
        advantage: the advantage estimator.
        update: pi_old's source (``old_logprobs``) and whether the update is exactly on-policy.
        batching: how the no-grad forwards are cut (micro-batches, token budget, head chunks, padding-free).
        loss: the sampling temperature (the log-probs describe the sampled distribution) and the KL penalty's
            beta when it is applied in the reward: ``R_i - beta * sum_t m_it kl_it(old, ref)``.
        moe: Routing Replay and the routing metrics: whether pi_old's experts are recorded (R2, or the
            routing-change metric off-policy); ``routing_replay: rollout`` (R3) forces the engine's routes in
            this pass too and hands them to the update instead of pi_old's (``RolloutBatch.rollout_routing``,
            required then).
        kl: the KL estimator (used here only when the penalty is in the reward).
        mismatch_correction: rollout/trainer importance weights, or None.
        masks: the token masks of the ``pre_update`` stage (``components.token_selection``): computed here once,
            from pi_old's log-probs (and entropies) over the whole rollout batch, after the advantages.
    """

    def __init__(
        self,
        advantage: Advantage,
        update: UpdateOptions,
        batching: BatchingOptions,
        loss: LossOptions,
        moe: MoEOptions,
        kl: KL | None = None,
        mismatch_correction: MismatchCorrection | None = None,
        masks: Sequence[TokenMask] = (),
    ) -> None:
        if update.old_logprobs == "rollout" and mismatch_correction is not None:
            raise ValueError(
                "model.update.old_logprobs=rollout makes pi_old the engine's: there is no mismatch to correct."
            )
        self.masks = list(masks)
        self.with_entropy = any(m.needs_entropy for m in self.masks)
        if self.with_entropy and update.old_logprobs == "rollout":
            names = ", ".join(type(m).__name__ for m in self.masks if m.needs_entropy)
            raise ValueError(
                f"{names} reads pi_old's entropies, which the engine does not report: set model.update.old_logprobs"
                " to auto or recompute (the trainer's pass computes them)."
            )
        self.advantage = advantage
        self.kl = kl if loss.reward_kl_coef > 0 else None
        self.kl_in_reward_coef = loss.reward_kl_coef
        self.mismatch_correction = mismatch_correction
        self.temperature = loss.temperature
        self.batching = batching
        self.record_routing = moe.records_old_routing(update.on_policy)
        self.replay_rollout = moe.replay == "rollout"
        needs_trainer_old = self.kl is not None or mismatch_correction is not None or bool(self.masks)
        self.source = old_logprob_source(update.old_logprobs, update.on_policy, needs_trainer_old)

    def __call__(
        self,
        batch: RolloutBatch,
        policy: nn.Module,
        reference: nn.Module | None = None,
        routing: RoutingController | None = None,
        agree: Callable[[int], int] | None = None,
    ) -> PreUpdateResult:
        """Run the pass on ``batch`` with ``policy`` (pi_old), ``reference`` and ``routing`` (MoE only);
        ``agree`` makes every rank run as many micro-batches (``training.splits.micro_batches``)."""
        metrics: dict[str, float] = {}
        start = time.perf_counter()
        if self.replay_rollout:
            if batch.rollout_routing is None:
                raise ValueError(
                    "model.moe.routing_replay: rollout needs the engine's MoE routes, and this batch has none: train"
                    " with GSPOModule and RolloutDataModule (which ask the engine for them), or connect the policy"
                    " with datamodule.connect(PolicyLink(model, report_routes=True)) before the first rollout."
                )
            batch = dataclasses.replace(batch, routing=batch.rollout_routing, routing_mask=batch.rollout_routing_mask)
        # a stale batch (asynchronous rollouts) was not sampled by pi_theta: pi_old is the trainer's pass then
        # (the decoupled objective's proximal policy), unless the engine's log-probs were chosen
        source = "trainer" if self.source == "none" and batch.is_stale else self.source
        old, chosen, entropy = self._old_logprobs(batch, policy, routing, agree, source)
        metrics["time/old_logprob_s"] = time.perf_counter() - start
        mismatch = None
        if chosen is not None and batch.rollout_routing is not None:
            mismatch = rollout_mismatch_counts(
                batch.rollout_routing, batch.rollout_routing_mask, chosen, batch.response_mask
            )
        experts = batch.routing if self.replay_rollout else chosen
        is_weights, mismatch_metrics = self._mismatch(batch, old, source)
        metrics.update(mismatch_metrics)
        start = time.perf_counter()
        ref = None
        if reference is not None:
            ref = self._logprobs(reference, batch, agree=agree).logprobs
        metrics["time/ref_logprob_s"] = time.perf_counter() - start
        penalised = None
        if self.kl is not None:
            mask = batch.response_mask
            kl = self.kl(old.masked_fill(~mask, 0), ref.masked_fill(~mask, 0))
            penalty = self.kl_in_reward_coef * seq_sum(kl, mask)  # (N,)
            metrics["rollout/kl_penalty_mean"] = penalty.mean().item()
            penalised = batch.rewards - penalty
        with_rewards = dataclasses.replace(batch, old_logprobs=old, ref_logprobs=ref, penalised_rewards=penalised)
        advantages = self.advantage(with_rewards)
        # pi_old is the policy these statistics describe, over the whole rollout batch
        masked = apply_masks(
            self.masks, old, old, advantages, batch.response_mask, batch.rollout_logprobs, entropy, batch.response_ids
        )
        token_kl_coef = None
        if masked is not None:
            is_weights = masked.weights if is_weights is None else is_weights * masked.weights
            token_kl_coef = masked.kl_coef
            metrics.update({k: float(v) for k, v in masked.metrics.items()})
        return PreUpdateResult(
            advantages=advantages,
            old_logprobs=old,
            ref_logprobs=ref,
            routing=experts,
            routing_mask=batch.routing_mask if self.replay_rollout else None,
            rollout_mismatch=mismatch,
            is_weights=is_weights,
            token_kl_coef=token_kl_coef,
            penalised_rewards=penalised,
            metrics=metrics,
        )

    def _old_logprobs(
        self,
        batch: RolloutBatch,
        policy: nn.Module,
        routing: RoutingController | None,
        agree: Callable | None,
        source: OldLogprobSource,
    ) -> NoGradPass:
        """pi_old's log-probs from the resolved source, the experts its routers chose when it ran with
        ``routing`` (under Rollout Routing Replay, while forced to the engine's), and its entropies when a token
        mask reads them."""
        if source == "rollout" and batch.rollout_logprobs is None:
            raise ValueError("old_logprobs='rollout' needs an engine that reports log-probs (e.g. VLLMEngine).")
        observe = self.record_routing or self.replay_rollout or batch.rollout_routing is not None
        routing = routing if observe else None
        if source == "trainer":
            return self._logprobs(policy, batch, routing, agree, self.with_entropy)
        experts = None
        if routing is not None and self.record_routing and not self.replay_rollout:
            # Routing Replay or the routing metric need pi_old's experts even without its log-probs
            experts = self._logprobs(policy, batch, routing, agree).experts
        return NoGradPass(batch.rollout_logprobs if source == "rollout" else None, experts)

    def _logprobs(
        self,
        model: nn.Module,
        batch: RolloutBatch,
        routing: RoutingController | None = None,
        agree=None,
        with_entropy: bool = False,
    ) -> NoGradPass:
        b = self.batching
        return no_grad_logprobs(
            model, batch, self.temperature, b.micro_batch_size, routing, b.logprob_chunk_size,
            b.micro_batch_tokens, agree, b.padding_free, replay=self.replay_rollout, with_entropy=with_entropy,
        )  # fmt: skip

    def _mismatch(
        self, batch: RolloutBatch, old: Tensor | None, source: OldLogprobSource
    ) -> tuple[Tensor | None, dict[str, float]]:
        """The engine's log-prob gap to the trainer's pi_old, and the correction's weights when configured."""
        if source != "trainer" or batch.rollout_logprobs is None:
            return None, {}
        if self.mismatch_correction is not None:
            out = self.mismatch_correction(old, batch.rollout_logprobs, batch.response_mask)
            return out.weights, {k: float(v) for k, v in out.metrics.items()}
        if batch.engine_is_policy:  # the same module sampled: its gap to the trainer's pass is kernel rounding
            return None, {}
        gap = (old - batch.rollout_logprobs).abs()[batch.response_mask]
        if not gap.numel():
            return None, {}
        return None, {"sampling/logprob_diff_mean": float(gap.mean()), "sampling/logprob_diff_max": float(gap.max())}
