"""Run one GSPO update on a fixed rollout batch and save the full policy gradient (rank 0).

Usage: python grad_script.py OUT_FILE DEVICES [ddp|fsdp2|nodes] [lora]. With DEVICES=2, Lightning launches a
second process (gloo) and each rank trains on its half of the same batch, under DDP or FSDP2
(ModelParallelStrategy, each decoder layer sharded); the saved gradient must equal the one of a single
process that trains on the whole batch. ``nodes``: DEVICES nodes of one process each (``trainer.num_nodes``):
the caller starts one invocation per node with NODE_RANK, MASTER_ADDR and MASTER_PORT set, as on a cluster.
Each rank also writes how many times it loaded the model's weights (``OUT_FILE.loads<rank>``): under FSDP2 only
rank 0 may (unless ``lora``: LoRA adapters on every linear layer and the fused experts, every rank loading the
frozen base).
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from gspo_lightning.data import AdditionTask
from gspo_lightning.engines import SamplingConfig
from gspo_lightning.module import GSPOModule
from gspo_lightning.rewards import FunctionReward
from gspo_lightning.rollout import RolloutDataModule, RolloutOptions
from gspo_lightning.training.options import BatchingOptions, LossOptions, PolicyOptions, UpdateOptions

MODEL = "builtin:tiny-qwen3-moe-random"
LOADS: list[str] = []
_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__


def _counting_from_pretrained(cls, name, *args, **kwargs):
    LOADS.append(str(name))
    return _from_pretrained(cls, name, *args, **kwargs)


AutoModelForCausalLM.from_pretrained = classmethod(_counting_from_pretrained)


def completion_length(prompts, completions, answers):
    """A reward that varies within groups even for an untrained model."""
    return [float(len(c)) for c in completions]


class FixedHalfData(RolloutDataModule):
    """Every rank builds the same full batch (same seed, same initial weights) and keeps its half."""

    rank_and_world = property(lambda self: (0, 1))

    def next_rollout(self):
        torch.manual_seed(123)
        full = super().next_rollout()
        rank, world = self.trainer.global_rank, self.trainer.world_size
        per_rank = len(full) // world
        return full.select(torch.arange(rank * per_rank, (rank + 1) * per_rank))


class CaptureGrad(GSPOModule):
    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out = out

    def on_before_optimizer_step(self, optimizer):
        grads = {}
        for name, param in self.policy.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            if hasattr(grad, "full_tensor"):  # a DTensor shard under FSDP2: gather it (a collective)
                grad = grad.full_tensor()
                grad = grad.wait() if hasattr(grad, "wait") else grad
            grads[name] = grad.detach().clone()
        Path(f"{self.out}.loads{self.global_rank}").write_text(str(len(LOADS)))
        if self.trainer.is_global_zero:
            torch.save(grads, self.out)
        super().on_before_optimizer_step(optimizer)


def main(out: str, devices: int, strategy: str, lora: bool = False) -> None:
    data = FixedHalfData(
        prompts=AdditionTask(num_train=64, num_val=0),
        rewards=[FunctionReward(completion_length)],
        tokenizer=MODEL,
        rollout=RolloutOptions(prompts_per_step=4, num_samples=4),
        sampling=SamplingConfig(max_new_tokens=8),
    )
    module = CaptureGrad(
        out,
        policy=PolicyOptions(path=MODEL),
        update=UpdateOptions(mini_batches=1, max_grad_norm=None, shuffle_mini_batches=False, old_logprobs="recompute"),
        batching=BatchingOptions(micro_batch_size=3),
        loss=LossOptions(aggregation="seq-mean-token-mean"),
        peft=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None,
    )
    nodes = devices if strategy == "nodes" else 1
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices // nodes,
        num_nodes=nodes,
        strategy=_strategy(strategy, devices),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)


def _strategy(name: str, devices: int):
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    return "ddp_find_unused_parameters_true" if devices > 1 else "auto"


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "ddp", "lora" in sys.argv[4:])
