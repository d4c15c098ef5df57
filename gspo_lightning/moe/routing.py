"""Routing Replay and routing-change measurement for transformers MoE models.

transformers' MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE) route with a ``*TopKRouter`` module that
returns ``(router_logits (S, E), routing_weights (S, k), selected_experts (S, k))`` for the S flattened
token positions of a forward. A forward hook on each router lets us

- **record** the experts it chose (during the pi_old pass), and
- **replay** recorded experts: the router's choice is replaced by the recorded one and the routing weights
  are recomputed from the *current* logits at those experts (softmax, then renormalised over the k chosen
  when the router normalises), so gradients still reach the router.

Routing Replay is the GSPO paper's (arXiv 2507.18071, §5.3) device that makes token-level ratios usable on
MoE models: pi_theta is evaluated with pi_old's experts, so the ratio measures the policy change and not
the expert reshuffle. With replay off, :func:`routing_change_frac` measures that reshuffle ("expert
activation volatility"): the fraction of (response token, MoE layer) pairs whose top-k expert set changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Literal

import torch
from torch import Tensor, nn

from gspo_lightning.moe.layout import MoELayout

Mode = Literal["off", "record", "replay"]


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The top-k router modules of ``model``, in layer order."""
    routers = []
    for module in model.modules():
        name = type(module).__name__
        weight = getattr(module, "weight", None)
        duck = hasattr(module, "top_k") and hasattr(module, "num_experts") and isinstance(weight, nn.Parameter)
        if name.endswith("TopKRouter") or (duck and name.endswith("Router")):
            routers.append(module)
    return routers


class RoutingController:
    """Records or replays the experts chosen by every router of one model.

    Recorded and replayed routing is indexed by sequence: ``(n, L, S, k)`` for n sequences of S positions
    (the whole ``[prompt | response]`` row), L MoE layers and k experts per token, so any micro-batch of a
    batch can replay its own rows.

    Raises:
        ValueError: the model has no router this module recognises.
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(
                f"{type(model).__name__} has no top-k router module (transformers' *TopKRouter): Routing Replay"
                " and routing metrics support the transformers MoE families (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE)."
            )
        self.mode: Mode = "off"
        self._shape: tuple[int, int] = (0, 0)  # (n, S) of the forward being recorded or replayed
        self._replay: Tensor | None = None  # (n, L, S, k)
        self._replay_mask: Tensor | None = None  # (n * S,) bool: positions replayed (others route naturally)
        self._real: Tensor | None = None  # (n * S,) bool: the positions a packed forward runs
        self._recorded: list[Tensor | None] = [None] * len(self.routers)
        self._chosen: list[Tensor | None] = [None] * len(self.routers)
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    @torch.no_grad()
    def routers_replay_unchanged(self, positions: int = 8) -> list[str]:
        """Names of the routers whose own choice, recorded then replayed, is not reproduced exactly.

        Replay recomputes the routing weights as a softmax over the router's logits at the recorded experts
        (renormalised when the router normalises its top-k). That is the identity for softmax-top-k routers
        (Qwen-MoE, Mixtral, OLMoE) and not for others (DeepSeek-V3's sigmoid + bias + scaling router): there
        it would silently change the model. Routers whose weights are partitioned (DeepSpeed ZeRO-3) cannot
        be called on their own and are not checked.
        """
        ids = torch.zeros(1, positions, dtype=torch.long)
        failed = []
        for i, router in enumerate(self.routers):
            weight = router.weight
            if weight.numel() == 0:
                continue
            g = torch.Generator().manual_seed(i)
            # a model built on the meta device (sharded loading) has no values yet: the identity does not
            # depend on them, so the check runs on random ones of the same shapes
            tensors = {**dict(router.named_parameters()), **dict(router.named_buffers())}
            if any(t.is_meta for t in tensors.values()):
                tensors = {n: torch.randn(t.shape, generator=g).to(t.dtype) for n, t in tensors.items()}
            dtype = next(iter(tensors.values())).dtype
            hidden = torch.randn(positions, weight.shape[-1], generator=g).to(dtype)
            with self.recording(ids):
                own = torch.func.functional_call(router, tensors, (hidden,))
                experts = self._recorded[i]
            replay = torch.zeros(1, self.num_layers, positions, experts.shape[-1], dtype=torch.long)
            replay[:, i] = experts.cpu()
            with self.replaying(ids, replay):
                replayed = torch.func.functional_call(router, tensors, (hidden,))
            if not torch.allclose(own[1].float(), replayed[1].float(), rtol=1e-5, atol=1e-6):
                failed.append(f"{type(router).__name__} (MoE layer {i})")
        return failed

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs, output):
            if self.mode == "off":
                return output
            logits, weights, experts = output
            self._chosen[layer] = self._unpack(experts)  # the router's own choice, even under replay
            if self.mode == "replay":
                own = experts
                experts = self._replay[:, layer].reshape(-1, self._replay.shape[-1])
                experts = experts[self._real] if self._real is not None else experts
                experts = experts.to(device=logits.device, dtype=torch.long)
                if self._replay_mask is not None:
                    keep = self._replay_mask[self._real] if self._real is not None else self._replay_mask
                    experts = torch.where(keep[:, None].to(logits.device), experts, own.long())
                probs = torch.softmax(logits.float(), dim=-1)
                weights = probs.gather(-1, experts)
                if getattr(module, "norm_topk_prob", True):
                    weights = weights / weights.sum(-1, keepdim=True)
                weights = weights.to(output[1].dtype)
            self._recorded[layer] = self._unpack(experts)
            return logits, weights, experts

        return hook

    def _unpack(self, experts: Tensor) -> Tensor:
        """(positions, k) experts of a forward -> (n, S, k); packed forwards scatter back (0 at padding)."""
        n, s = self._shape
        experts = experts.detach()
        if self._real is None:
            return experts.reshape(n, s, -1)
        full = experts.new_zeros(n * s, experts.shape[-1])
        full[self._real] = experts
        return full.reshape(n, s, -1)

    @contextmanager
    def recording(self, input_ids: Tensor, packed: Tensor | None = None) -> Iterator[None]:
        """Record the experts of forwards on ``input_ids`` (n, S); read them with :meth:`recorded`.

        ``packed``: the (n, S) attention mask when the forward runs padding-free (only the real tokens, packed
        into one row, reach the routers); routes still read back as (n, L, S, k)."""
        with self._mode("record", input_ids, packed):
            yield

    @contextmanager
    def replaying(
        self, input_ids: Tensor, experts: Tensor, packed: Tensor | None = None, mask: Tensor | None = None
    ) -> Iterator[None]:
        """Force ``experts`` (n, L, S, k) in forwards on ``input_ids`` (n, S), backward recomputation included;
        ``packed`` as in :meth:`recording`; ``mask`` (n, S) bool: the positions to force (None: all), the
        others keep the router's own choice."""
        if experts.shape[:3] != (input_ids.shape[0], self.num_layers, input_ids.shape[1]):
            raise ValueError(
                f"Recorded routing of shape {tuple(experts.shape)} does not match {input_ids.shape[0]} sequences x"
                f" {self.num_layers} MoE layers x {input_ids.shape[1]} positions."
            )
        self._replay = experts
        self._replay_mask = mask.reshape(-1).bool() if mask is not None else None
        try:
            with self._mode("replay", input_ids, packed):
                yield
        finally:
            self._replay, self._replay_mask = None, None

    @contextmanager
    def _mode(self, mode: Mode, input_ids: Tensor, packed: Tensor | None) -> Iterator[None]:
        previous = self.mode, self._shape, self._real
        self.mode, self._shape = mode, (input_ids.shape[0], input_ids.shape[1])
        self._real = packed.reshape(-1).bool() if packed is not None else None
        self._recorded = [None] * self.num_layers
        self._chosen = [None] * self.num_layers
        try:
            yield
        finally:
            self.mode, self._shape, self._real = previous

    def recorded(self) -> Tensor:
        """(n, L, S, k) experts the last recorded or replayed forward used, as small integers."""
        return self._stack(self._recorded)

    def chosen(self) -> Tensor:
        """(n, L, S, k) experts the routers themselves chose in the last forward: under replay these differ from
        :meth:`recorded` (the replayed ones) wherever routing has moved since pi_old."""
        return self._stack(self._chosen)

    @staticmethod
    def _stack(layers: list[Tensor | None]) -> Tensor:
        if any(r is None for r in layers):
            raise RuntimeError("No routing was recorded: run a forward inside recording() or replaying() first.")
        stacked = torch.stack(layers, dim=1)
        return stacked.to(torch.uint8 if int(stacked.max()) < 256 else torch.int16)


def routing_context(
    controller: RoutingController | None,
    input_ids: Tensor,
    experts: Tensor | None,
    replay: bool,
    packed: Tensor | None = None,
    mask: Tensor | None = None,
    observe: bool = False,
) -> AbstractContextManager[None]:
    """The routing context of a forward (and its backward) on ``input_ids`` (n, S).

    Replays ``experts`` (n, L, S, k) when ``replay`` (at the positions of ``mask`` (n, S), None: all), else
    records the experts chosen so that :func:`routing_change_frac` can compare them with ``experts``. A no-op
    for a dense model (no controller) or when there is nothing to replay or compare with (``experts`` is None)
    unless ``observe`` (record anyway: the rollout-routing mismatch reads the routers' choice). ``packed``: the
    attention mask of a padding-free forward (:meth:`RoutingController.recording`).
    """
    if controller is None:
        return nullcontext()
    if replay and experts is not None:
        return controller.replaying(input_ids, experts, packed, mask)
    if experts is not None or observe:
        return controller.recording(input_ids, packed)
    return nullcontext()


def _changed_sets(old: Tensor, new: Tensor, t: int) -> Tensor:
    """(n, L, T) whether the top-k expert *set* differs at the positions whose logits predict the T response
    tokens: the log-prob of response token j is computed at position P-1+j, so the positions compared are
    P-1 .. P+T-2, the last prompt position up to the second-to-last response one."""
    old_sorted = old[:, :, -t - 1 : -1].long().sort(-1).values
    new_sorted = new[:, :, -t - 1 : -1].to(old.device).long().sort(-1).values
    return (old_sorted != new_sorted).any(-1)


def routing_change_frac(old: Tensor, new: Tensor, response_mask: Tensor) -> Tensor:
    """Fraction of (response token, MoE layer) pairs whose top-k expert *set* differs (:func:`_changed_sets`).

    Args:
        old, new: (n, L, S, k) experts, S = prompt width P + response width T.
        response_mask: (n, T) bool.
    """
    changed = _changed_sets(old, new, response_mask.shape[1])
    mask = response_mask.bool()[:, None, :].expand_as(changed)
    return (changed & mask).sum().float() / mask.sum().clamp(min=1).float()


def rollout_mismatch_counts(
    engine: Tensor, engine_mask: Tensor, trainer: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """How often the trainer's routers disagree with the rollout engine's, per MoE layer.

    Compares, at the positions that produce the response tokens' log-probs (:func:`_changed_sets`), the
    engine's top-k expert set with the one the trainer's router chose itself (its own choice, also while
    replaying the engine's).

    Args:
        engine: (n, L, S, k) the engine's experts; engine_mask: (n, S) bool, the positions it reported.
        trainer: (n, L, S, k) the experts the trainer's routers chose.
        response_mask: (n, T) bool.

    Returns:
        (L,) differing (position, layer) pairs per layer, the number of routed positions compared (per layer),
        and the number of response positions the engine reported no route for.
    """
    t = response_mask.shape[1]
    response = response_mask.bool()
    routed = engine_mask[:, -t - 1 : -1].to(response.device).bool() & response  # (n, T)
    changed = _changed_sets(engine.to(response.device), trainer, t) & routed[:, None, :]
    return changed.sum((0, 2)), routed.sum(), (response & ~routed).sum()


def routing_controller(
    policy: nn.Module, moe: MoELayout | None, replay: str, track: bool, aux_loss_coef: float
) -> RoutingController | None:
    """The policy's routing controller when replay or a routing metric (``track``) needs one, else None.

    Raises:
        ValueError: an MoE option was set for a dense model, or replay would change this model's routing
            (record-then-replay on a small input is checked to be the identity, router by router).
    """
    if moe is None:
        if aux_loss_coef > 0:
            raise ValueError("model.moe.router_aux_loss_coef > 0, but the model is not a mixture of experts.")
        if replay != "off":
            raise ValueError(f"model.moe.routing_replay={replay}, but the model is not a mixture of experts.")
        return None
    if replay == "off" and not track:
        return None
    controller = RoutingController(policy)
    failed = controller.routers_replay_unchanged() if replay != "off" else []
    if failed:
        raise ValueError(
            f"model.moe.routing_replay: replaying a model's own routing changes it for {failed[0]}"
            f"{f' and {len(failed) - 1} more' if len(failed) > 1 else ''}: replay recomputes routing weights as a"
            " softmax over the chosen experts, which this router does not use. Set model.moe.routing_replay: off."
        )
    return controller
