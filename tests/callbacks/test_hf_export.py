"""The export's weights: the full weights of the LightningModule's child, gathered from whatever shards them.

``HFExport`` reads them through :func:`gspo_lightning.sharding.full_child_state_dict`, a layer below training;
it is checked on a plain module and, for real on CPU (2 gloo ranks), under FSDP1 (the wrapped root holds the
child's weights as flat parameters) and FSDP2 (DTensors).
"""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from gspo_lightning.sharding import full_child_state_dict, is_fsdp1

HF_EXPORT = Path(__file__).parents[2] / "gspo_lightning" / "callbacks" / "hf_export.py"


class Root(nn.Module):
    """A LightningModule's shape: the exported child ``policy`` next to another child."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.policy = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
        self.other = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.policy(x))


def _expected() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in Root().policy.state_dict().items()}


def test_unsharded_child_is_copied_with_its_own_keys():
    root = Root()
    state = full_child_state_dict(root, "policy", root.policy)
    assert not is_fsdp1(root) and list(state) == list(_expected())
    torch.testing.assert_close(state, _expected())


def test_the_callback_does_not_import_training():
    tree = ast.parse(HF_EXPORT.read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("gspo_lightning.training")], imported


def _gather_on_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # FSDP1 on CPU cannot offload its full state dict to the CPU under FULL_SHARD (torch frees the gathered
    # storage), so the wrapper here keeps whole copies; the child's own parameters are still the root's views
    fsdp1 = FullyShardedDataParallel(Root(), device_id=torch.device("cpu"), sharding_strategy=ShardingStrategy.NO_SHARD)
    fsdp1(torch.ones(1, 6)).sum().backward()  # as in training: the export follows steps
    results = {"fsdp1": (is_fsdp1(fsdp1), full_child_state_dict(fsdp1, "policy", fsdp1.module.policy))}
    fsdp2 = Root()
    fully_shard(fsdp2.policy, mesh=init_device_mesh("cpu", (2,)))
    results["fsdp2"] = (is_fsdp1(fsdp2), full_child_state_dict(fsdp2, "policy", fsdp2.policy))
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_child_is_gathered_in_full(tmp_path):
    out = str(tmp_path / "state")
    torch.multiprocessing.spawn(_gather_on_rank, args=(str(tmp_path / "init"), out), nprocs=2)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        assert results["fsdp1"][0] and not results["fsdp2"][0]
        # the full weights reach rank 0 only, the one that writes the export
        expected = _expected() if rank == 0 else {}
        for strategy, (_, state) in results.items():
            assert list(state) == list(expected), (rank, strategy)
            torch.testing.assert_close(state, expected, msg=f"rank {rank}, {strategy}")
