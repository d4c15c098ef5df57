"""`GSPOModule`'s options in typed groups, and the decisions made from them, each in one place.

jsonargparse nests each group under the module's key (``model.update.mini_batches``, ``--model.update.mini_batches
2``); the components (ratio, advantage, clip, KL, token masks, mismatch correction, optimizer, peft) stay flat.
Every default lives on a field here, and every decision the module and the memory planner both need (exactly
on-policy? which Routing Replay? is a reference model loaded? are MoE routes recorded?) is a method here: the
planner (``gspo_lightning.plan``) builds these groups from a parsed configuration and asks them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from gspo_lightning.components.aggregation import AggregationMode, check_mode
from gspo_lightning.models import DType
from gspo_lightning.training.logprobs import DEFAULT_CHUNK_SIZE

ReplayMode = Literal["off", "old", "rollout"]
"""Routing Replay (``model.moe.routing_replay``): none, pi_old's routes (R2, GSPO paper §5.3), or the rollout
engine's (R3, arXiv 2510.11370)."""

OldLogprobs = Literal["auto", "recompute", "rollout"]
"""The user's choice of pi_old (``model.update.old_logprobs``)."""

ATTENTION_KERNELS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""The ``attn_implementation`` values the trainer's forwards and ``generate`` both handle (padded and, except
eager, packed batches); others (``paged|...`` kernels serve continuous batching, not these forwards) are refused."""


@dataclass(frozen=True)
class PolicyOptions:
    """The policy to train: where ``from_pretrained`` loads it from and how.

    Attributes:
        path: local folder, hub id, or ``builtin:<name>`` (a model the project builds); the tokenizer's too.
        trust_remote_code: let ``from_pretrained`` run the model repository's own code.
        dtype: dtype of the weights at load time (float32 keeps float32 master weights).
        attn_implementation: transformers attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); None: its
            default.
        gradient_checkpointing: recompute activations in backward to save memory.
        disable_dropout: set the policy's dropout to 0, so the ratio is exactly 1 at identical weights (as TRL).
    """

    path: str = "builtin:tiny-qwen3-moe-addition"
    trust_remote_code: bool = False
    dtype: DType = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        kernel = self.attn_implementation
        if kernel is not None and kernel not in ATTENTION_KERNELS:
            raise ValueError(
                f"model.policy.attn_implementation={kernel!r} is not one the trainer can use: pick one of"
                f" {', '.join(ATTENTION_KERNELS)}, or null for transformers' default."
            )

    def check_device(self, device_type: str) -> None:
        """Refuse a kernel that cannot run on ``device_type`` (``flex_attention`` compiles for GPUs only).

        Raises:
            ValueError: with the option and the fix.
        """
        if self.attn_implementation in ("flex_attention", "flash_attention_2", "flash_attention_3") and (
            device_type == "cpu"
        ):
            raise ValueError(
                f"model.policy.attn_implementation={self.attn_implementation} needs a GPU (on the CPU it fails"
                " inside the compiler): use sdpa or eager here."
            )

    def load_kwargs(self) -> dict[str, Any]:
        """The ``from_pretrained`` arguments (``gspo_lightning.models.load_causal_lm``)."""
        return {
            "model": self.path,
            "dtype": self.dtype,
            "trust_remote_code": self.trust_remote_code,
            "attn_implementation": self.attn_implementation,
        }


@dataclass(frozen=True)
class LossOptions:
    """Terms of the loss besides the components' objective, and the sampling constants the log-probs follow.

    Attributes:
        kl_coef: beta of the KL penalty to the reference model (0: none, and no reference model is loaded).
        kl_in_reward: subtract ``kl_coef * sum_t kl(old, ref)`` from each reward instead of adding a loss term.
        entropy_coef: weight of the entropy bonus (0: the entropy is only logged).
        temperature: the sampling temperature; logits are divided by it (linked from data.sampling.temperature).
        max_new_tokens: the generation limit T_max, the constant of seq-mean-token-sum-norm (linked from
            data.sampling.max_new_tokens).
        aggregation: how per-token losses become one scalar (docs/algorithms.md, "Loss aggregation").
    """

    kl_coef: float = 0.0
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    temperature: float = 1.0
    max_new_tokens: int | None = None
    aggregation: AggregationMode = "seq-mean-token-mean"

    def __post_init__(self) -> None:
        check_mode(self.aggregation)
        if self.kl_coef < 0:
            raise ValueError(
                f"model.loss.kl_coef={self.kl_coef} rewards drifting away from the reference: use 0 (off) or > 0."
            )

    @property
    def loss_kl_coef(self) -> float:
        """beta of the KL term in the loss (0 when the penalty goes into the reward)."""
        return 0.0 if self.kl_in_reward else self.kl_coef

    @property
    def reward_kl_coef(self) -> float:
        """beta of the KL penalty in the reward (the pre-update pass's; 0 when it is a loss term)."""
        return self.kl_coef if self.kl_in_reward else 0.0


@dataclass(frozen=True)
class UpdateOptions:
    """The optimizer steps of a rollout batch and the safety rails around each.

    Attributes:
        mini_batches: optimizer steps per rollout batch and epoch.
        epochs: passes over each rollout batch.
        shuffle_mini_batches: shuffle sequences before splitting them into mini-batches.
        old_logprobs: pi_old: ``auto`` skips its pass when exactly on-policy, ``recompute`` always runs it,
            ``rollout`` takes the engine's log-probs.
        max_grad_norm: clip gradients to this global norm (None: no clipping; the norm is logged anyway).
        max_nonfinite_steps: consecutive optimizer steps with a non-finite gradient (each skipped) that stop the
            run.
    """

    mini_batches: int = 4
    epochs: int = 1
    shuffle_mini_batches: bool = True
    old_logprobs: OldLogprobs = "auto"
    max_grad_norm: float | None = 1.0
    max_nonfinite_steps: int = 3

    def __post_init__(self) -> None:
        if self.mini_batches < 1 or self.epochs < 1:
            raise ValueError(
                f"model.update.mini_batches and model.update.epochs must be >= 1, got {self.mini_batches} and"
                f" {self.epochs}."
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(
                f"model.update.max_grad_norm={self.max_grad_norm}: clipping needs a positive norm (a negative one"
                " reverses the gradient, 0 freezes training). Use a positive value, or null for no clipping."
            )
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"model.update.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.")

    @property
    def on_policy(self) -> bool:
        """Whether the only update of a rollout batch is made by the policy that sampled it (then, with
        ``old_logprobs: auto``, pi_old is pi_theta detached and its pass is skipped)."""
        return self.mini_batches == 1 and self.epochs == 1 and self.old_logprobs == "auto"

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout batch (what ``trainer.max_steps`` counts)."""
        return self.mini_batches * self.epochs


@dataclass(frozen=True)
class BatchingOptions:
    """How a mini-batch is cut into forwards and computed; none of these change the gradient.

    Attributes:
        micro_batch_size: sequences per forward/backward (gradient accumulation); None: the whole mini-batch.
        micro_batch_tokens: instead, length-sorted sequences packed into micro-batches of at most this many
            tokens, each trimmed to its own prompt and response widths.
        logprob_chunk_size: response tokens per chunk of the output projection, O(chunk x V) memory; None: all
            at once.
        padding_free: forward each micro-batch's real tokens packed into one row, position ids restarting per
            sequence: no compute on padding, results equal to the padded path's.
    """

    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    logprob_chunk_size: int | None = DEFAULT_CHUNK_SIZE
    padding_free: bool = False

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "micro_batch_tokens", "logprob_chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.batching.{name} must be >= 1 or null, got {value}.")


@dataclass(frozen=True)
class MoEOptions:
    """Mixture-of-experts options: Routing Replay, routing metrics, the load-balancing loss.

    Attributes:
        routing_replay: ``old`` (or true) forces pi_old's experts in the update's forwards (R2, GSPO paper
            §5.3); ``rollout`` forces the rollout engine's in every trainer forward (R3, arXiv 2510.11370);
            ``off`` (or false).
        track_routing_change: log ``moe/routing_change_frac``, the experts changed since pi_old.
        track_rollout_routing: ask the engine for its routes and log ``moe/rollout_routing_mismatch_frac`` even
            without ``routing_replay: rollout`` (which always logs it).
        router_aux_loss_coef: weight of the model's load-balancing loss (0: off).
    """

    routing_replay: ReplayMode | bool = "off"
    track_routing_change: bool = True
    track_rollout_routing: bool = False
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        replay = self.routing_replay
        if not isinstance(replay, bool) and replay not in ("off", "old", "rollout"):
            raise ValueError(
                f"model.moe.routing_replay={replay!r}: use off, old (pi_old's routes, R2) or rollout (the engine's"
                " routes, R3)."
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"model.moe.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}.")

    @property
    def replay(self) -> ReplayMode:
        """``routing_replay`` as one of ``"off" | "old" | "rollout"`` (true is ``"old"``, false ``"off"``)."""
        if isinstance(self.routing_replay, bool):
            return "old" if self.routing_replay else "off"
        return self.routing_replay

    @property
    def tracks_routing(self) -> bool:
        """Whether a routing metric needs the routers observed (without replay)."""
        return self.track_routing_change or self.track_rollout_routing

    @property
    def wants_rollout_routes(self) -> bool:
        """Whether the rollout engine must report its MoE routes (R3, or the rollout-routing metric)."""
        return self.replay == "rollout" or self.track_rollout_routing

    def records_old_routing(self, on_policy: bool) -> bool:
        """Whether the pre-update pass records pi_old's experts: R2 replays them; off-policy, the routing-change
        metric compares with them."""
        return self.replay == "old" or not on_policy

    def holds_routing_records(self, on_policy: bool) -> bool:
        """Whether a rollout batch carries (N, L, P+T, k) expert records through the update (memory)."""
        return (self.replay != "off" or self.tracks_routing) and (self.replay != "off" or not on_policy)


@dataclass(frozen=True)
class ShardingOptions:
    """Options of the sharded strategies (FSDP2, FSDP, ZeRO).

    Attributes:
        fsdp_mixed_precision: FSDP2: compute in bfloat16 with float32 master weights and gradient reduction.
        fsdp_cpu_offload: FSDP2: keep parameters, gradients and optimizer states in host memory.
        sync_every_micro_batch: reduce(-scatter) gradients across ranks after every micro-batch, not only a
            mini-batch's last; None: on under sharded strategies, which would otherwise hold every gradient
            unsharded until the last micro-batch.
    """

    fsdp_mixed_precision: bool = False
    fsdp_cpu_offload: bool = False
    sync_every_micro_batch: bool | None = None


@dataclass(frozen=True)
class ModuleOptions:
    """All of ``GSPOModule``'s option groups together (what the module and the planner read)."""

    policy: PolicyOptions = field(default_factory=PolicyOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    update: UpdateOptions = field(default_factory=UpdateOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    moe: MoEOptions = field(default_factory=MoEOptions)
    sharding: ShardingOptions = field(default_factory=ShardingOptions)

    @classmethod
    def from_config(cls, model: dict[str, Any]) -> ModuleOptions:
        """The groups of a parsed ``model`` configuration (``Namespace.as_dict()``; absent groups: defaults)."""
        groups = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        return cls(**{name: make(**(model.get(name) or {})) for name, make in groups.items()})

    def as_dicts(self) -> dict[str, dict[str, Any]]:
        """Each group as a plain dict (what checkpoints store as hyperparameters)."""
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}


GROUPS = tuple(f.name for f in fields(ModuleOptions))
"""The names of the module's option groups, as they appear under ``model.``."""


def needs_reference(loss: LossOptions, advantage: Any) -> bool:
    """Whether a frozen reference model is loaded: a KL term (loss or reward) or an advantage that reads reference
    log-probs (``Advantage.needs_ref``; ``advantage`` may be the instance or its class)."""
    return loss.kl_coef > 0 or bool(getattr(advantage, "needs_ref", False))


def check_aggregation(loss: LossOptions) -> None:
    """Refuse ``seq-mean-token-sum-norm`` without ``max_new_tokens``: its T_max must be one constant on every
    micro-batch and rank, not each one's padded width.

    Raises:
        ValueError: with the fix.
    """
    if loss.aggregation == "seq-mean-token-sum-norm" and loss.max_new_tokens is None:
        raise ValueError(
            "model.loss.aggregation=seq-mean-token-sum-norm divides by a constant T_max: set model.loss.max_new_tokens"
            " (the CLI links it to data.sampling.max_new_tokens)."
        )
