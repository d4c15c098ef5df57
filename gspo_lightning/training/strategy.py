"""The update loop's adapter to Lightning's strategies (DDP, FSDP1, FSDP2, DeepSpeed).

Everything the loop does differently per strategy lives here: the global loss denominators, skipping the
gradient all-reduce while accumulating, the gradient scale of data-parallel averaging, clipping and the
gradient norm and the FSDP2 mesh. The loop in
:class:`~gspo_lightning.module.GSPOModule` then reads the same under every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn

from gspo_lightning.components.aggregation import LossCounts


@contextmanager
def _fsdp2_no_sync(module: nn.Module) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class StrategyAdapter:
    """What the update loop needs from ``trainer.strategy``.

    Args:
        trainer: the running Trainer.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    @property
    def strategy(self):
        return self.trainer.strategy

    @property
    def loss_scale(self) -> int:
        """Data-parallel strategies average gradients over ranks while the loss counts are global: scaling
        each rank's loss by the world size turns that average into the sum the formula asks for."""
        return self.trainer.world_size

    def global_counts(self, mask: Tensor) -> LossCounts:
        """The loss denominators of ``mask`` summed over every data-parallel rank (see ``aggregation``)."""
        local = LossCounts.from_mask(mask)
        local_t = torch.tensor([local.num_tokens, local.num_seqs], device=mask.device, dtype=torch.float64)
        summed = self.strategy.reduce(local_t, reduce_op="sum")
        return LossCounts(num_tokens=float(summed[0]), num_seqs=float(summed[1]))

    @property
    def sharded(self) -> bool:
        """Whether the strategy shards gradients (FSDP1, FSDP2, DeepSpeed ZeRO)."""
        return isinstance(self.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))

    def backward_sync(
        self, last: bool, policy: nn.Module | None = None, every: bool | None = None
    ) -> AbstractContextManager:
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) of every micro-batch but the ``last``,
        unless ``every`` (None: when the strategy shards gradients).

        Skipping saves communication; DDP holds full gradients either way, so it costs nothing there. FSDP
        would accumulate every gradient unsharded (float32 under mixed precision) until the last micro-batch:
        for Qwen3-30B-A3B 114 GiB per GPU instead of 14 (``gspo-lightning plan``), so sharded strategies
        reduce-scatter after every micro-batch by default.
        """
        if last or (self.sharded if every is None else every):
            return nullcontext()
        if policy is not None and callable(getattr(policy, "set_requires_gradient_sync", None)):
            return _fsdp2_no_sync(policy)
        block = getattr(self.strategy, "block_backward_sync", None)
        return nullcontext() if block is None else block()

    def clip_gradients(self, policy: nn.Module, max_norm: float | None) -> Tensor:
        """Clip the policy's gradients by global norm and return the norm before clipping.

        Call it once the gradients are unscaled (``on_before_optimizer_step``). DeepSpeed clips inside its
        own step (its config's ``gradient_clipping``): NaN is returned, and :meth:`grad_norm_after_step`
        reads DeepSpeed's norm. FSDP1 computes the norm over all shards through its root wrapper; FSDP2 and
        plain modules use ``clip_grad_norm_`` (DTensor-aware).
        """
        limit = max_norm if max_norm is not None else float("inf")
        if isinstance(self.strategy, DeepSpeedStrategy):
            return torch.full((), float("nan"))
        if isinstance(self.strategy, FSDPStrategy):
            norm = self.trainer.model.clip_grad_norm_(limit)
        else:
            params = [p for p in policy.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, limit) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.detach().float()

    def check_clipping(self, max_grad_norm: float | None) -> None:
        """Refuse a DeepSpeed ``gradient_clipping`` that differs from ``model.update.max_grad_norm``: DeepSpeed clips
        inside its own step with its config's value, which would silently replace the module's.

        Raises:
            ValueError: the two disagree (no clipping is ``max_grad_norm: null`` and ``gradient_clipping: 0``).
        """
        if not isinstance(self.strategy, DeepSpeedStrategy):
            return
        deepspeed = float(self.strategy.config.get("gradient_clipping", 0.0) or 0.0)
        wanted = float(max_grad_norm or 0.0)
        if deepspeed != wanted:
            raise ValueError(
                f"DeepSpeed clips gradients itself with its config's gradient_clipping={deepspeed}, but"
                f" model.update.max_grad_norm={max_grad_norm}: set both to the same value (0 / null for no clipping)."
            )

    def nonfinite(self, norm: Tensor) -> bool:
        """Whether the step's gradient norm (from :meth:`clip_gradients`) is NaN or infinite. Under DeepSpeed the
        norm is only known after its step, which handles overflow itself: never here."""
        return not isinstance(self.strategy, DeepSpeedStrategy) and not bool(torch.isfinite(norm))

    def weights_finite(self, policy: nn.Module) -> bool:
        """Whether every weight of the policy, on every rank, is finite (a collective).

        Sharded parameters are checked shard by shard (FSDP2 DTensors locally, ZeRO-3 partitions).
        """
        local = []
        for p in policy.parameters():
            p = p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if hasattr(p, "to_local") else p
            local.append(torch.isfinite(p.detach()).all())
        bad = torch.tensor([0.0 if not local or bool(torch.stack(local).all()) else 1.0], dtype=torch.float64)
        return float(self.reduce(bad, "max")[0]) == 0.0

    def agree_max(self, count: int) -> int:
        """The largest ``count`` over the data-parallel ranks (a collective)."""
        return int(self.reduce(torch.tensor([float(count)], dtype=torch.float64), "max")[0])

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """``tensor`` reduced over the data-parallel ranks with ``op`` (``"sum"``, ``"max"``, ``"min"``)."""
        device = self.trainer.lightning_module.device
        return self.strategy.reduce(tensor.to(device), reduce_op=op).cpu()

    def grad_norm_after_step(self, norm: Tensor) -> Tensor:
        """The gradient norm of the step just taken: ``norm`` from :meth:`clip_gradients`, or DeepSpeed's."""
        if isinstance(self.strategy, DeepSpeedStrategy):
            return torch.as_tensor(float(self.trainer.model.get_global_grad_norm() or 0.0))
        return norm

    def data_parallel_mesh(self, device_mesh: Callable[[], object]):
        """The FSDP2 data-parallel mesh under Lightning's ``ModelParallelStrategy``, else None.

        Args:
            device_mesh: returns the module's device mesh (only called under that strategy).
        """
        if not isinstance(self.strategy, ModelParallelStrategy):
            return None
        mesh = device_mesh()
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError("Tensor parallelism is not supported yet: set tensor_parallel_size=1 (FSDP2 only).")
        return mesh["data_parallel"] if "data_parallel" in names else mesh
