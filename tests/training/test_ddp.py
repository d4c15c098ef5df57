"""Two-process DDP on CPU (gloo): it trains, and splitting a rollout batch over ranks keeps the gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import free_port, tiny_args

HERE = Path(__file__).parent
pytestmark = pytest.mark.distributed


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_split_over_two_ranks_gives_the_single_process_gradient(tmp_path, tiny_path):
    script = str(HERE / "grad_script.py")
    _run([sys.executable, script, str(tmp_path / "one.pt"), "1"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "two.pt"), "2", "ddp"], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    total = sum(float(g.abs().sum()) for g in one.values())
    assert total > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_two_nodes_on_localhost_give_the_single_process_gradient(tmp_path, tiny_path):
    """Two launcher invocations, NODE_RANK 0 and 1, one process each, meeting at MASTER_ADDR:MASTER_PORT over gloo
    (what two machines do, on one): each trains on its half of the batch; the gradient is the single process's."""
    script = str(HERE / "grad_script.py")
    _run([sys.executable, script, str(tmp_path / "one.pt"), "1"], tmp_path)
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path / "two.pt"), "2", "nodes"],
            cwd=tmp_path,
            env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1], "node 1 joined as the second rank"
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and sum(float(g.abs().sum()) for g in one.values()) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp2_split_over_two_ranks_gives_the_single_process_gradient(tmp_path, tiny_path):
    script = str(HERE / "grad_script.py")
    _run([sys.executable, script, str(tmp_path / "one.pt"), "1"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "two.pt"), "2", "fsdp2"], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # the weights were loaded on rank 0 only and reached rank 1 as its shards (equal gradients below)
    loads = [int((tmp_path / f"two.pt.loads{rank}").read_text()) for rank in (0, 1)]
    assert loads == [1, 0]
    assert sum(float(g.abs().sum()) for g in one.values()) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_lora_split_over_two_ranks_gives_the_single_process_gradient(tmp_path, tiny_path, strategy):
    script = str(HERE / "grad_script.py")
    _run([sys.executable, script, str(tmp_path / "one.pt"), "1", "ddp", "lora"], tmp_path)
    _run([sys.executable, script, str(tmp_path / "two.pt"), "2", strategy, "lora"], tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    adapters = [n for n in one if "lora_" in n]
    assert adapters and all(float(one[n].abs().sum()) == 0 for n in one if "lora_" not in n), "only adapters train"
    assert any("experts" in n for n in adapters) and sum(float(one[n].abs().sum()) for n in adapters) > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


# the untrained model never answers right: reward odd digits so that advantages (and updates) are non-zero
VARIED_REWARD = ["--data.rewards", '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]']
FSDP2 = [
    "--trainer.devices",
    "2",
    "--trainer.strategy",
    "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size",
    "2",
    "--trainer.strategy.tensor_parallel_size",
    "1",
]


def test_fsdp2_fit_checkpoint_resume_and_full_export(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM

    _run(
        [
            sys.executable,
            "-m",
            "gspo_lightning.cli",
            "fit",
            # token-budget micro-batches: the ranks must agree on how many (every FSDP2 forward is a collective)
            *tiny_args(
                tmp_path,
                *FSDP2,
                *VARIED_REWARD,
                "--model.batching.micro_batch_tokens",
                "30",
                "--trainer.callbacks+=HFExport",
            ),
        ],
        tmp_path,
    )
    version = tmp_path / "lightning_logs" / "version_0"
    ckpt = version / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), "FSDP2 writes a distributed checkpoint folder"
    exported = AutoModelForCausalLM.from_pretrained(version / "hf_export" / "final")
    original = AutoModelForCausalLM.from_pretrained(tiny_path)
    for (name, value), (_, before) in zip(exported.state_dict().items(), original.state_dict().items()):
        assert value.shape == before.shape, f"{name} was exported sharded"
    assert any(not torch.equal(v, b) for v, b in zip(exported.state_dict().values(), original.state_dict().values()))
    resume = tiny_args(tmp_path / "resumed", *FSDP2, max_steps=8)
    _run([sys.executable, "-m", "gspo_lightning.cli", "fit", *resume, "--ckpt_path", str(ckpt)], tmp_path)
    assert (tmp_path / "resumed" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_dir()


def test_ddp_fit_through_the_cli(tmp_path, tiny_path):
    args = tiny_args(tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true")
    _run([sys.executable, "-m", "gspo_lightning.cli", "fit", *args], tmp_path)
    ckpt = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
