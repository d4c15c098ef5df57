"""`RolloutDataModule`: B prompts x G samples per step, generated, scored and batched on the data side."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from gspo_lightning.agents.environment import Environment
from gspo_lightning.agents.options import AgentOptions
from gspo_lightning.agents.sampler import Sampler
from gspo_lightning.agents.setup import build_sampler, check_budget
from gspo_lightning.agents.trajectory import Trajectory
from gspo_lightning.batch import RolloutBatch
from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.data.prompts import PromptSource
from gspo_lightning.data.tasks import AdditionTask
from gspo_lightning.engines.base import RolloutEngine, SamplingConfig
from gspo_lightning.engines.transformers_engine import TransformersEngine
from gspo_lightning.models import load_tokenizer
from gspo_lightning.rewards.answer import ExactMatchReward
from gspo_lightning.rewards.base import Reward
from gspo_lightning.rewards.combine import check_weights
from gspo_lightning.rng import derive_seed, seeded_rng
from gspo_lightning.rollout.asynchronous import AsyncRollouts
from gspo_lightning.rollout.collector import RolloutCollector, decode_responses, reward_inputs
from gspo_lightning.rollout.evaluation import EvalResult
from gspo_lightning.rollout.link import PolicyLink
from gspo_lightning.rollout.options import EncodingOptions, HeldOutOptions, RolloutOptions
from gspo_lightning.rollout.prompt_set import encode_split, encode_train
from gspo_lightning.rollout.streams import EvalStream, RolloutStream, identity, prompt_fingerprint

DEFAULT_SAMPLING = SamplingConfig()


class RolloutDataModule(pl.LightningDataModule):
    """Produces :class:`RolloutBatch`es: prompts -> rollout engine (G samples each) -> rewards -> batch.

    Each training step draws ``prompts_per_step`` prompts in total, split evenly over the data-parallel
    ranks (each rank generates for its own share), in a seeded order reshuffled every pass over the data.
    The position in that order is saved in checkpoints, so a resumed run continues with the next prompts;
    a fingerprint of the training prompts is saved with it, and resuming on other prompts is refused.

    Each rollout batch is sampled from a random stream of its own, seeded from a base seed (the process's
    ``torch.initial_seed()``, i.e. ``seed_everything``; saved in checkpoints), the rank and the rollout
    index (``gspo_lightning.rng``); held-out evaluations likewise. So a resumed run draws the same samples as an
    uninterrupted one, whatever else drew random numbers in between, and rollouts leave the process's
    random stream as they found it.

    The engine generates with the trainer's policy, handed over once through :meth:`connect` (the one seam,
    ``rollout.link``: :class:`~gspo_lightning.module.GSPOModule` connects when its model is built; outside a
    Trainer call ``connect(PolicyLink(model))``) and bound to the engine before the first generation. The module
    sends the updated weights back after its optimizer steps (:meth:`sync_weights`); nothing else flows from
    training to generation.

    Args:
        prompts: where prompts come from (default: the built-in 2-digit :class:`AdditionTask`).
        rewards: reward functions summed with ``reward_weights`` (default: ``[ExactMatchReward()]``).
        reward_weights: one weight per reward (default 1 each).
        accuracy_reward: scores held-out completions; a score > 0 counts as correct (default: the first reward).
        engine: the rollout engine (default: :class:`TransformersEngine`).
        tokenizer: tokenizer path or hub id (the CLI links it to model.policy.path).
        sampling: temperature, top-p, top-k, max new tokens.
        rollout: B prompts x G samples per rollout batch, dynamic sampling, the prompt order's seed.
        encoding: prompt length limit, chat template, system prompt.
        heldout: how many held-out prompts are evaluated, with how many samples, in what batches.
        tools: functions (import paths in YAML) the model may call; rollouts become multi-turn trajectories.
        environment: a stateful environment class, one instance per trajectory (multi-turn).
        rollout_function: your own agent loop, returning token-level trajectories (multi-turn).
        agent: multi-turn limits (turns, token budget, tool-response cap, tool timeout) and the tool-call parser.
        max_staleness: asynchronous rollouts: the next batches are generated while one trains, each sample at most
            this many updates stale (0: synchronous; docs/async.md).
    """

    def __init__(
        self,
        prompts: PromptSource | None = None,
        rewards: list[Reward] | None = None,
        reward_weights: list[float] | None = None,
        accuracy_reward: Reward | None = None,
        engine: RolloutEngine | None = None,
        tokenizer: str | None = None,
        sampling: SamplingConfig = DEFAULT_SAMPLING,
        rollout: RolloutOptions = RolloutOptions(),  # noqa: B008 - frozen dataclasses: a shared default is safe
        encoding: EncodingOptions = EncodingOptions(),  # noqa: B008
        heldout: HeldOutOptions = HeldOutOptions(),  # noqa: B008
        tools: list[Callable] | None = None,
        environment: Callable[[], Environment] | None = None,
        rollout_function: Callable[..., Sequence[Trajectory]] | None = None,
        agent: AgentOptions = AgentOptions(),  # noqa: B008
        max_staleness: int = 0,
    ) -> None:
        super().__init__()
        self.source = prompts if prompts is not None else AdditionTask()
        self.rewards = list(rewards) if rewards else [ExactMatchReward()]
        check_weights(len(self.rewards), reward_weights)
        self.reward_weights = reward_weights
        self.accuracy_reward = accuracy_reward or self.rewards[0]
        self.engine = engine if engine is not None else TransformersEngine()
        self.tokenizer_path = tokenizer
        self.sampling = sampling
        self.rollout, self.encoding, self.heldout = rollout, encoding, heldout
        ways = [
            name
            for name, v in (("tools", tools), ("environment", environment), ("rollout_function", rollout_function))
            if v
        ]
        if len(ways) > 1:
            raise ValueError(
                f"data.{' and data.'.join(ways)} are both set: pick one way into multi-turn rollouts (an environment's"
                " public methods are its tools; a rollout function runs its own loop)."
            )
        self.tools, self.environment, self.rollout_function = list(tools or []), environment, rollout_function
        self.agent = agent
        if max_staleness < 0:
            raise ValueError(f"data.max_staleness must be >= 0 (0: synchronous rollouts), got {max_staleness}.")
        self.max_staleness = max_staleness
        self.asynchronous = AsyncRollouts(max_staleness, self.engine) if max_staleness else None
        self.sampler: Sampler | None = None
        self.tool_schemas: list[dict] = []
        self.epoch = 0
        self.cursor = 0
        self.steps = 0
        self.rollout_seed: int | None = None  # base of the rollout streams; fixed on first use or restored
        self.tokenizer = None
        self._link: PolicyLink | None = None
        self._train: list[EncodedPrompt] | None = None
        self._fingerprint: dict[str, Any] | None = None  # of the training prompts, saved in checkpoints
        self._val: list[EncodedPrompt] = []
        self._restored_prompts: dict[str, Any] | None = None  # a checkpoint's fingerprint, checked once encoded

    # -- set-up -----------------------------------------------------------------------------------------
    @property
    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        if self.tokenizer_path is None:
            raise ValueError(
                "RolloutDataModule needs a tokenizer: set data.tokenizer (normally linked to model.policy.path)."
            )
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.sampler, self.tool_schemas = build_sampler(self)
        rank, world = self.rank_and_world
        if self.rollout.prompts_per_step % world:
            raise ValueError(
                f"data.rollout.prompts_per_step={self.rollout.prompts_per_step} must be divisible by the {world}"
                " data-parallel ranks."
            )
        self._train = encode_train(self, world)
        self._fingerprint = prompt_fingerprint(self._train)
        self._check_restored_prompts()
        val = encode_split(self, self.source.validation()[: self.heldout.size], "held-out")
        # every rank gets the same number of held-out prompts: sharded forwards and metric syncs are collectives
        self._val = val[: len(val) // world * world][rank::world]
        from gspo_lightning.rewards.base import check_reward_columns  # a reward argument no column fills: now

        check_reward_columns(self.rewards, (p.record.extras for p in self._train), "the training prompts")
        if val:
            check_reward_columns([self.accuracy_reward], (p.record.extras for p in val), "the held-out prompts")
        self.engine.configure(self.sampling, self.tokenizer)
        self.collector = RolloutCollector(
            engine=self.engine,
            tokenizer=self.tokenizer,
            rewards=self.rewards,
            reward_weights=self.reward_weights,
            num_samples=self.rollout.num_samples,
            max_new_tokens=self.sampling.max_new_tokens,
            dynamic_sampling=self.rollout.dynamic_sampling,
            max_sampling_rounds=self.rollout.max_sampling_rounds,
            sampler=self.sampler,
        )

    def connect(self, link: PolicyLink) -> None:
        """Take the policy to generate with (``rollout.link``); the engine is bound to it before its first
        generation. Engines told to report MoE routes are told now, before they build."""
        self._check_context(link.policy)
        if link.report_routes:
            self.engine.request_routes()
        self._link = link

    def _check_context(self, policy: nn.Module) -> None:
        """Refuse a generation limit the policy's context cannot hold next to the longest prompt (a model that
        rarely stops would otherwise generate past its positions, or hang the first evaluation)."""
        context = getattr(policy.config, "max_position_embeddings", None)
        prompts = [*(self._train or []), *self._val]
        longest = max((len(p.input_ids) for p in prompts), default=1)
        new = self.sampling.max_new_tokens
        check_budget(self.sampler, self.agent, context, longest)
        if isinstance(context, int) and longest + new > context:
            raise ValueError(
                f"data.sampling.max_new_tokens={new} does not fit the model's context (max_position_embeddings="
                f"{context}) after the longest prompt ({longest} tokens): set it to at most {context - longest}."
            )

    def _ensure_bound(self) -> None:
        # Bound on first use rather than in a hook: `trainer.validate` prefetches its first held-out batch
        # before any hook runs, and binding once here serves fit, validate and callbacks alike.
        if self.engine.is_bound:
            return
        if self._link is None:
            raise RuntimeError(
                "The rollout engine has no policy: train with GSPOModule (it connects its policy when its model is"
                " built), or call datamodule.connect(PolicyLink(model)) outside a Trainer."
            )
        if self.asynchronous is not None:
            self.asynchronous.bind(self._link.policy)  # generates with a copy while the policy trains
        else:
            self.engine.bind(self._link.policy)

    def sync_weights(self, policy: nn.Module) -> bool:
        """Send the updated weights to the engine (called by the module after its optimizer steps); returns
        whether the engine copied any (``RolloutEngine.sync_weights``). Asynchronous rollouts publish them as the
        next version instead, loaded into the engine when a batch needs them (``rollout.pipeline``)."""
        if self.asynchronous is not None:
            self.asynchronous.publish(self.steps, policy)
            return True
        return bool(self.engine.sync_weights(policy))

    # -- training prompts ---------------------------------------------------------------------------------
    def _rank_order(self, epoch: int) -> list[EncodedPrompt]:
        rank, world = self.rank_and_world
        assert self._train is not None
        g = torch.Generator().manual_seed(self.rollout.seed + epoch)
        order = torch.randperm(len(self._train), generator=g)
        per_rank = len(self._train) // world
        return [self._train[i] for i in order[rank::world][:per_rank].tolist()]

    def next_prompts(self, k: int) -> list[EncodedPrompt]:
        """The next ``k`` training prompts of this rank, moving on to a reshuffled pass when one ends."""
        out: list[EncodedPrompt] = []
        while len(out) < k:
            order = self._rank_order(self.epoch)
            take = order[self.cursor : self.cursor + k - len(out)]
            out.extend(take)
            self.cursor += len(take)
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def next_rollout(self) -> RolloutBatch:
        """This rank's next rollout batch: generated now, or taken from the asynchronous pipeline."""
        self._ensure_bound()
        if self.asynchronous is None:
            batch = self.produce(self.steps)
        else:
            if not self.asynchronous.running:
                self.asynchronous.start(self.produce, self.position, self.steps, self._link.policy)
            batch = self.asynchronous.take(self.steps)
        self.steps += 1
        return batch

    def produce(self, index: int) -> RolloutBatch:
        """Generate, score and assemble rollout batch ``index`` from its own random stream and the next prompts."""
        _, world = self.rank_and_world
        with seeded_rng(self._stream_seed("rollout", index)):
            batch = self.collector.collect(self.next_prompts, self.rollout.prompts_per_step // world)
        batch.metrics["epoch"] = self.prompt_epochs()
        return batch

    def position(self) -> dict[str, int]:
        """Where the prompt order stands: the pass over the data and the next prompt in it."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def prompt_epochs(self) -> float:
        """Passes over this rank's training prompts so far (1.5: one pass and half of the next), logged as ``epoch``
        in place of Lightning's loop epoch, which stays 0 in a run of rollout batches (``max_epochs`` is not used)."""
        per_rank = len(self._train) // self.rank_and_world[1] if self._train else 0
        return float(self.epoch) + (self.cursor / per_rank if per_rank else 0.0)

    def _base_seed(self) -> int:
        """The base of the random streams: restored from a checkpoint, else the process's seed at first use."""
        if self.rollout_seed is None:
            self.rollout_seed = torch.initial_seed()
        return self.rollout_seed

    def _stream_seed(self, *parts: int | str) -> int:
        """The seed of this rank's random stream named by ``parts`` (see the class docstring)."""
        rank, _ = self.rank_and_world
        return derive_seed(self._base_seed(), rank, *parts)

    def _loader_kwargs(self) -> dict[str, Any]:
        """No workers; under asynchronous rollouts a generator of its own: a DataLoader draws its base seed when an
        iterator starts (each held-out evaluation), which must not come from the generator a batch samples from."""
        return {"num_workers": 0, **({"generator": torch.Generator()} if self.asynchronous else {})}

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(RolloutStream(self), batch_size=None, collate_fn=identity, **self._loader_kwargs())

    # -- held-out evaluation -----------------------------------------------------------------------------
    def evaluate(self, prompts: list[EncodedPrompt]) -> EvalResult:
        """Greedy and sampled correctness of ``prompts`` under the current policy."""
        self._ensure_bound()
        with self._holding_engine():
            greedy = self._correct(prompts, 1, greedy=True)[:, 0]
            k = self.heldout.num_samples
            empty = torch.zeros(len(prompts), 0, dtype=torch.bool)
            sampled = self._correct(prompts, k, greedy=False) if k > 0 else empty
        return EvalResult(greedy_correct=greedy, sampled_correct=sampled, epoch=self.prompt_epochs())

    def _holding_engine(self):
        """Asynchronous rollouts: the engine between two batches, with the current weights (``AsyncRollouts.hold``)."""
        return self.asynchronous.hold(self._link.policy) if self.asynchronous else contextlib.nullcontext()

    def evaluate_heldout(self) -> Iterator[EvalResult]:
        """Evaluate this rank's held-out prompts, ``val_batch_size`` at a time, each from its own random stream."""
        size = self.heldout.batch_size
        for start in range(0, len(self._val), size):
            self._ensure_bound()
            with self._holding_engine(), seeded_rng(self._stream_seed("eval", self.steps, start)):
                result = self.evaluate(self._val[start : start + size])
            yield result

    def _correct(self, prompts: list[EncodedPrompt], k: int, greedy: bool) -> Tensor:
        generation = self.sampler.sample(prompts, k, greedy=greedy)
        completions = decode_responses(self.tokenizer, generation)
        inputs = reward_inputs(prompts, generation, completions, k, self.sampling.max_new_tokens)
        return (self.accuracy_reward(inputs) > 0).view(len(prompts), k)

    @property
    def val_prompts(self) -> list[EncodedPrompt]:
        """This rank's held-out prompts."""
        return self._val

    @override
    def val_dataloader(self) -> DataLoader | list:
        if not self._val:
            return []
        return DataLoader(EvalStream(self), batch_size=None, collate_fn=identity, **self._loader_kwargs())

    # -- checkpointing -----------------------------------------------------------------------------------
    @override
    def teardown(self, stage: str) -> None:
        if self.asynchronous is not None:
            self.asynchronous.close()
        self.engine.close()

    @override
    def state_dict(self) -> dict[str, Any]:
        position, in_flight = self.position(), None
        if self.asynchronous is not None:  # the consumer's position, and the batches generated ahead of it
            position, in_flight = self.asynchronous.state(self.steps, position)
        state = {**position, "steps": self.steps, "seed": self.rollout.seed}
        if in_flight is not None:
            state["in_flight"] = in_flight
        state["rollout_seed"] = self._base_seed()
        if self._fingerprint is not None:
            state["prompts"] = self._fingerprint
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seed = self.rollout.seed
        if state_dict.get("seed", seed) != seed:
            raise ValueError(
                f"The checkpoint's prompt order used seed {state_dict['seed']}, this run seed {seed}:"
                " resume with the same data.rollout.seed to continue where the run stopped."
            )
        self._restored_prompts = state_dict.get("prompts")  # absent in checkpoints written before fingerprints
        self._check_restored_prompts()  # now if set up, else once the prompts are encoded
        if state_dict.get("rollout_seed") is not None:
            self.rollout_seed = int(state_dict["rollout_seed"])
        self.steps = int(state_dict["steps"])
        position = {"epoch": int(state_dict["epoch"]), "cursor": int(state_dict["cursor"])}
        if self.asynchronous is not None:  # in-flight batches are trained next; the producer goes on after them
            position = self.asynchronous.restore(state_dict.get("in_flight"), position)
        elif state_dict.get("in_flight"):
            rank_zero_warn(
                f"The checkpoint holds {len(state_dict['in_flight']['batches'])} rollout batches generated ahead"
                " (data.max_staleness > 0); this run is synchronous, so they are generated again with its weights."
            )
        self.epoch, self.cursor = position["epoch"], position["cursor"]

    def _check_restored_prompts(self) -> None:
        """Refuse to continue a checkpoint's position in the prompt order on other prompts."""
        saved, current = self._restored_prompts, self._fingerprint
        if saved is None or current is None:  # nothing to compare, or not set up yet: checked in setup
            return
        self._restored_prompts = None
        if saved != current:
            raise ValueError(
                f"The checkpoint was trained on another prompt set ({saved['count']} training prompts, fingerprint"
                f" {saved['sha256']}) than this run ({current['count']}, {current['sha256']}), so its position in"
                " the prompt order would apply to other data: resume with the same data.prompts (and"
                " data.encoding), or start a new run without --ckpt_path."
            )
