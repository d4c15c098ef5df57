"""The loss of one micro-batch in the update: the policy objective plus the entropy and MoE terms.

``loss = objective(lp, old, A, m, ref) - entropy_coef * agg(H) + router_aux_loss_coef * aux * n' / N'``
(docs/algorithms.md, "How the pieces meet"). The objective and the entropy are this micro-batch's share of
the mini-batch value: they are normalised by the mini-batch's global counts, so the shares of all
micro-batches and ranks add up to the whole-mini-batch formula exactly. The MoE auxiliary loss is not split
this way: ``aux`` is the model's own load-balancing loss of this forward (transformers'
``load_balancing_loss_func``: ``E x sum_e f_e P_e`` with the expert fractions ``f`` and mean router
probabilities ``P`` of this micro-batch's real tokens), weighted by the micro-batch's share ``n' / N'`` of the
mini-batch's sequences with a response (over all ranks). What is optimised is the sequence-weighted mean over
micro-batches of each micro-batch's own load-balancing loss; a product of means does not add up over parts,
so it equals the whole-mini-batch load-balancing loss only when the mini-batch is one forward (weight 1).
"""

from __future__ import annotations

from torch import Tensor, nn

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.aggregation import LossCounts, aggregate, masked_metric_mean
from gspo_lightning.components.objective import PolicyObjective
from gspo_lightning.moe.routing import RoutingController, rollout_mismatch_counts, routing_change_frac
from gspo_lightning.moe.stats import RouterStats
from gspo_lightning.training.logprobs import response_logprobs
from gspo_lightning.training.options import BatchingOptions, LossOptions


class PolicyLoss:
    """Forward one micro-batch through the policy and compute its loss and metrics.

    Args:
        objective: ratio -> clip -> aggregation (+ KL in the loss).
        loss: the sampling temperature (the log-probs describe the sampled distribution) and the entropy bonus's
            weight (0: the entropy is only logged, without gradient).
        batching: the output projection's chunk size and padding-free packing (``training.logprobs``).
        router_aux_loss_coef: weight of an MoE model's load-balancing loss (0: off); each micro-batch adds its
            own, weighted by its share of the sequences with a response (see the module docstring).
    """

    def __init__(
        self,
        objective: PolicyObjective,
        loss: LossOptions,
        batching: BatchingOptions,
        router_aux_loss_coef: float = 0.0,
    ) -> None:
        self.objective = objective
        self.chunk_size, self.padding_free = batching.logprob_chunk_size, batching.padding_free
        self.temperature = loss.temperature
        self.entropy_coef = loss.entropy_coef
        self.router_aux_loss_coef = router_aux_loss_coef

    def __call__(
        self,
        policy: nn.Module,
        micro: RolloutBatch,
        counts: LossCounts,
        routing: RoutingController | None = None,
        router_stats: RouterStats | None = None,
        measure_routing_change: bool = True,
        measure_rollout_mismatch: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The micro-batch's loss (its share of the mini-batch loss) and its ``policy/*`` / ``moe/*`` metrics.

        Args:
            policy: the policy being trained.
            micro: a micro-batch with advantages (and pi_old / reference log-probs where the run has them).
            counts: the global denominators of the mini-batch (see ``aggregation``).
            routing: the MoE routing controller; inside its context the routing change is measured.
            router_stats: receives this forward's router logits (MoE models); None for a dense model.
            measure_routing_change: log ``moe/routing_change_frac`` (the routers' own choice against pi_old's
                experts); off for the first mini-batch, whose weights are pi_old's, so 0 by construction.
            measure_rollout_mismatch: add to ``router_stats`` how the routers' own choice differs from the
                engine's routes (``moe.routing.rollout_mismatch_counts``); for forwards still on pi_old's weights
                when the pre-update pass did not measure it.
        """
        want_router = router_stats is not None or self.router_aux_loss_coef > 0
        out = response_logprobs(
            policy,
            micro.input_ids,
            micro.attention_mask,
            micro.response_mask.shape[1],
            temperature=self.temperature,
            with_entropy=True,
            entropy_grad=self.entropy_coef > 0,
            output_router_logits=want_router,
            chunk_size=self.chunk_size,
            padding_free=self.padding_free,
            loss_mask=micro.response_mask,
        )
        # exactly on-policy there is no pi_old pass: pi_old = pi_theta, detached
        old = micro.old_logprobs if micro.old_logprobs is not None else out.logprobs.detach()
        result = self.objective(
            out.logprobs, old, micro.advantages, micro.response_mask, micro.ref_logprobs, counts, micro.is_weights,
            micro.rollout_logprobs, micro.token_kl_coef,
        )  # fmt: skip
        loss, metrics = result.loss, dict(result.metrics)
        mask = micro.response_mask
        metrics["policy/entropy"] = masked_metric_mean(out.entropy, mask)
        if self.entropy_coef > 0:
            objective = self.objective
            entropy = aggregate(out.entropy, mask, objective.aggregation, counts, objective.max_len)
            loss = loss - self.entropy_coef * entropy
        if out.router_logits:
            if self.router_aux_loss_coef > 0:
                aux = out.aux_loss
                # n' / N': shares of the same sequences N' counts, so they add up to 1 over micro-batches and ranks
                share = micro.response_mask.any(-1).sum() / max(counts.num_seqs, 1.0)
                loss = loss + self.router_aux_loss_coef * aux * share
                metrics["moe/aux_loss"] = aux.detach().float()
            if router_stats is not None:
                router_stats.add(out.router_logits, out.router_token_mask)
        observed = routing is not None and routing.mode != "off"
        if measure_routing_change and observed and micro.routing is not None:
            metrics["moe/routing_change_frac"] = routing_change_frac(micro.routing, routing.chosen(), mask)
        if measure_rollout_mismatch and observed and router_stats is not None and micro.rollout_routing is not None:
            engine = (micro.rollout_routing, micro.rollout_routing_mask)
            router_stats.add_rollout_mismatch(*rollout_mismatch_counts(*engine, routing.chosen(), mask))
        metrics["policy/loss"] = loss.detach().float()
        return loss, metrics
