"""Two data-parallel ranks (gloo), each with its own in-process vLLM engine on its own prompts, synced."""

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.distributed]
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from tiny_models import TinySpec, tiny_model_path  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, path: str, queue) -> None:
    # vLLM's external launcher reads the torchrun variables
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from test_vllm_engine import PROMPTS, logprob_gap, train_steps

        from gspo_lightning.engines import SamplingConfig, VLLMEngine
        from gspo_lightning.models import load_causal_lm, load_tokenizer

        torch.manual_seed(0)
        policy, tokenizer = load_causal_lm(path), load_tokenizer(path)
        engine = VLLMEngine(kv_cache_memory_bytes=64 << 20)
        engine.configure(SamplingConfig(max_new_tokens=8), tokenizer)
        engine.bind(policy)
        shard = PROMPTS[rank::world]
        train_steps(policy)  # same seed on both ranks: the same update, as after a DDP step
        stale = logprob_gap(engine, policy, shard)
        engine.sync_weights(policy)
        queue.put(
            (
                rank,
                stale,
                logprob_gap(engine, policy, shard),
                engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend,
            )
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_each_rank_runs_and_syncs_its_own_engine():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    path = str(tiny_model_path(TinySpec(kind="moe")))  # built here: under torch.distributed only rank 0 would save
    mp.start_processes(_rank, args=(2, _free_port(), path, queue), nprocs=2, join=True, start_method="spawn")
    results = sorted(queue.get(timeout=60) for _ in range(2))
    for rank, stale, synced, backend in results:
        assert backend == "external_launcher", rank
        assert stale > 1e-3 and synced < 1e-4, (rank, stale, synced)
