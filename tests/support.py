"""Helpers the tests share: a hand-built rollout batch and the tiny CLI run."""

from __future__ import annotations

import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import ClassVar

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gspo_lightning import RolloutBatch
from gspo_lightning.engines import TransformersEngine

ROOT = Path(__file__).parents[1]


def make_batch(
    rewards: list[float],
    group_size: int,
    response_mask: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    t: int = 4,
    prompt_width: int = 2,
) -> RolloutBatch:
    """A RolloutBatch of len(rewards) sequences in groups of ``group_size``, with dummy token ids."""
    n = len(rewards)
    mask = response_mask if response_mask is not None else torch.ones(n, t, dtype=torch.bool)
    t = mask.shape[1]
    return RolloutBatch(
        input_ids=torch.ones(n, prompt_width + t, dtype=torch.long),
        attention_mask=torch.cat([torch.ones(n, prompt_width, dtype=torch.bool), mask.bool()], dim=1),
        response_mask=mask.bool(),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.arange(n) // group_size,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


def tool_args(root: Path, *extra: str, max_steps: int = 4, model: str = "builtin:tiny-qwen3-moe-calculator-random"):
    """The agent demo shrunk: max_steps / 2 rollout batches of 2 prompts x 2 trajectories, 2 mini-batches each."""
    return [
        "--config", str(ROOT / "configs" / "tool_demo.yaml"),
        "--model.policy.path", model,
        "--model.update.mini_batches", "2",
        "--data.prompts.init_args.num_train", "32",
        "--data.prompts.init_args.num_val", "4",
        "--data.rollout.prompts_per_step", "2",
        "--data.rollout.num_samples", "2",
        "--data.sampling.max_new_tokens", "24",
        "--data.heldout.batch_size", "4",
        "--data.heldout.num_samples", "2",
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "2",
        "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def tiny_args(root: Path, *extra: str, max_steps: int = 4) -> list[str]:
    """A run of max_steps / 2 rollout batches of 4 prompts x 4 samples, 2 mini-batches each."""
    return [
        "--config",
        str(ROOT / "configs" / "demo.yaml"),
        "--model.policy.path",
        "builtin:tiny-qwen3-moe-random",
        "--model.update.mini_batches",
        "2",
        "--data.prompts.init_args.num_train",
        "64",
        "--data.prompts.init_args.num_val",
        "8",
        "--data.rollout.prompts_per_step",
        "4",
        "--data.rollout.num_samples",
        "4",
        "--data.heldout.batch_size",
        "8",
        "--trainer.max_steps",
        str(max_steps),
        "--trainer.val_check_interval",
        "2",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def scalars(log_dir: Path) -> dict[str, list]:
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file in {log_dir}"
    out: dict[str, list] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(acc.Scalars(tag))
    return out


class RecordBatches(Callback):
    """Keeps the prompt indices of every rollout batch trained on, read from ``outputs`` as a user's callback would."""

    prompt_indices: ClassVar[list[list[int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RecordBatches.prompt_indices.append(outputs["batch"].prompt_index.tolist())


class CountingEngine(TransformersEngine):
    """The embedded engine, counting how often the policy is bound and synced (class-level, one run at a time)."""

    binds: ClassVar[list[int]] = []
    syncs: ClassVar[list[int]] = []

    def bind(self, policy) -> None:
        CountingEngine.binds.append(id(policy))
        super().bind(policy)

    def sync_weights(self, policy) -> None:
        CountingEngine.syncs.append(id(policy))
        super().sync_weights(policy)


def nested(side: str, flat: dict) -> dict:
    """A ``model`` or ``data`` configuration (``side``) from flat option names, nested into the option groups
    through the CLI's table of moved options (``{"mini_batches": 2}`` -> ``{"update": {"mini_batches": 2}}``)."""
    from gspo_lightning.config_checks import moved_options

    moved, out = moved_options(), {}
    for name, value in flat.items():
        path = moved.get(f"{side}.{name}")
        if path is None:
            out[name] = value
        else:
            _, group, field = path.split(".")
            out.setdefault(group, {})[field] = value
    return out


def grouped(side: str, **flat) -> dict:
    """Constructor arguments of GSPOModule (``side="model"``) or RolloutDataModule (``"data"``) from flat option
    names as the tests write them: ``mini_batches=2`` -> ``update=UpdateOptions(mini_batches=2)``, through the CLI's
    table of moved options; components and groups pass through."""
    from gspo_lightning.module import GSPOModule
    from gspo_lightning.rollout import RolloutDataModule

    cls = GSPOModule if side == "model" else RolloutDataModule
    hints = typing.get_type_hints(cls.__init__)
    config = nested(side, flat)
    return {k: hints[k](**v) if isinstance(v, dict) and k in hints and is_dataclass(hints[k]) else v
            for k, v in config.items()}  # fmt: skip


def built_module(model: str, **kwargs):
    """A GSPOModule with its models loaded, outside a Trainer (flat option names, see :func:`grouped`)."""
    from gspo_lightning.module import GSPOModule

    module = GSPOModule(**grouped("model", model=model, **kwargs))
    module.configure_model()
    return module


def accumulated_grads(module, batch):
    """The gradient of ``batch``'s loss accumulated over the module's micro-batches (size or token budget), each
    normalised by the whole batch's counts, as one optimizer step sees it."""
    from gspo_lightning import LossCounts
    from gspo_lightning.training.splits import micro_batches

    module.policy.zero_grad()
    counts = LossCounts.from_mask(batch.response_mask)
    batching = module.options.batching
    for _, piece in micro_batches(batch, batching.micro_batch_size, batching.micro_batch_tokens):
        with module.routing_context(piece):
            loss, _ = module.policy_loss(module.policy, piece, counts, module.routing)
            loss.backward()
    return torch.cat([p.grad.flatten() for p in module.policy.parameters() if p.grad is not None])


def prepared(module, batch: RolloutBatch) -> RolloutBatch:
    """``batch`` after the module's pre-update pass."""
    return module.pre_update(batch, module.policy, module.reference, module.routing).apply(batch)


class FakeScaler(Precision):
    """16-mixed's gradient scaling on the CPU (which has no fp16 AMP): the loss is multiplied by ``scale``
    before backward and the gradients divided by it inside ``optimizer_step``, as ``GradScaler.unscale_`` does,
    before Lightning's ``on_before_optimizer_step``."""

    scale = 1024.0

    def pre_backward(self, tensor, module):
        return super().pre_backward(tensor * self.scale, module)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        closure()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.scale)
        self._after_closure(model, optimizer)
        return optimizer.step(**kwargs)


def perturb_routers(model, scale: float = 0.5) -> None:
    """An update that reshuffles the experts: noise on every router's weight (seeded)."""
    from gspo_lightning.moe import find_routers

    torch.manual_seed(1)
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.add_(scale * torch.randn_like(router.weight))


def addition_datamodule(tokenizer, engine=None):
    """4 addition prompts x 4 samples per rollout batch, 8 new tokens at most, set up for fit."""
    from gspo_lightning.data import AdditionTask
    from gspo_lightning.engines import SamplingConfig
    from gspo_lightning.rollout import RolloutDataModule, RolloutOptions

    dm = RolloutDataModule(
        prompts=AdditionTask(num_train=40, num_val=4),
        tokenizer=tokenizer,
        rollout=RolloutOptions(prompts_per_step=4, num_samples=4),
        sampling=SamplingConfig(max_new_tokens=8),
        engine=engine,
    )
    dm.setup("fit")
    return dm


def free_port() -> int:
    """A TCP port nothing listens on now (for a rendezvous or a server started next)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
