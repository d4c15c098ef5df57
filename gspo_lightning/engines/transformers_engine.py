"""Rollouts with transformers ``generate`` on the live policy: the embedded engine that runs anywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from gspo_lightning.adapters import transformers_model
from gspo_lightning.engines.base import (
    ENGINES,
    Generation,
    RolloutEngine,
    limit_rows,
    pad_left,
    response_mask_until_eos,
)
from gspo_lightning.moe.capture import GenerationRoutes
from gspo_lightning.moe.layout import moe_layout
from gspo_lightning.sharding import is_sharded


class SampledTokenLogprobs(LogitsProcessor):
    """Records the log-prob of each sampled token at the sampling temperature, from the logits ``generate``
    computes anyway: ``log softmax(z / tau)`` at the token chosen.

    A logits processor sees step t's logits before the token is chosen and, at step t + 1, the token chosen at
    t (the last column of ``input_ids``). It keeps step t's logits (a reference, no copy) and their
    ``logsumexp(z / tau)`` (n numbers), never an ``(n, V)`` log-softmax: at a 151,936-token vocabulary a
    full-vocabulary temporary per step costs time and, through the allocator's fragmentation, memory.
    Transformers runs custom processors before its own warpers and none of them writes into the logits in
    place, so the logits here are the raw ones (the checkpoint's own processors are switched off by the engine).
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: tuple[Tensor, Tensor] | None = None  # step t's logits and logsumexp(z / tau)
        self.logprobs: list[Tensor] = []

    def _take(self, chosen: Tensor) -> None:
        if self.previous is not None:
            scores, lse = self.previous
            chosen_logit = scores.gather(-1, chosen[:, None].to(scores.device)).squeeze(-1).float()
            self.logprobs.append(chosen_logit / self.temperature - lse)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._take(input_ids[:, -1])
        scaled = scores.float() if self.temperature == 1.0 else scores.float() / self.temperature
        self.previous = (scores, torch.logsumexp(scaled, dim=-1))
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """(n, steps) log-probs of the generated tokens, once ``generate`` returned ``sequences``."""
        self._take(sequences[:, -1])
        self.previous = None
        return torch.stack(self.logprobs, dim=1).cpu()


class GenerationStopped(RuntimeError):
    """``generate`` stopped between decoding steps because the engine's ``stop_requested`` returned True (a
    SIGTERM, see ``gspo_lightning.callbacks.GracefulStop``); its partial rollouts were dropped, nothing trains on
    them."""


class _StopRequested(StoppingCriteria):
    """Ends every sequence of a ``generate`` call once ``stop_requested()`` is True (checked after each step)."""

    def __init__(self, stop_requested: Callable[[], bool]) -> None:
        self.stop_requested = stop_requested

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop_requested()), dtype=torch.bool, device=input_ids.device)


@ENGINES.register
class TransformersEngine(RolloutEngine):
    """transformers ``generate`` on the training policy itself (no copy, so no weight sync is needed).

    Prompts are left-padded and generated in chunks of ``batch_size`` prompts, each with
    ``num_return_sequences = G``. The policy is put in eval mode while generating and restored after. The
    model's own ``generation_config`` is ignored: only ``SamplingConfig`` shapes the rollouts. Sampled
    rollouts report each token's log-prob at the sampling temperature (:class:`SampledTokenLogprobs`), so
    ``model.update.old_logprobs: rollout`` and the mismatch correction work with this engine too. When routes are
    requested (:meth:`request_routes`), router hooks record the experts of every column ``generate`` runs
    (prefill and each decode step, :class:`~gspo_lightning.moe.capture.GenerationRoutes`). When
    ``stop_requested`` is set (a callable; the CLI's ``GracefulStop`` sets it to "a SIGTERM came"), it is checked
    after every decoding step, and once it returns True ``generate`` stops and raises :class:`GenerationStopped`.

    Args:
        batch_size: prompts per ``generate`` call (bounds the KV-cache memory); None means all at once.
        use_cache: use the KV cache while generating.
        synced_gpus: keep every rank stepping until all ranks finish (needed when the policy is sharded
            with FSDP2, whose forwards are collectives); None decides from the policy.
    """

    generates_with_policy = True

    def __init__(self, batch_size: int | None = None, use_cache: bool = True, synced_gpus: bool | None = None) -> None:
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
        self.batch_size = batch_size
        self.use_cache = use_cache
        self.synced_gpus = synced_gpus
        self.policy: nn.Module | None = None
        self.stop_requested: Callable[[], bool] | None = None

    def bind(self, policy: nn.Module) -> None:
        self.policy = policy

    @property
    def is_bound(self) -> bool:
        return self.policy is not None

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        greedy: bool = False,
        max_new_tokens: list[int] | None = None,
    ) -> Generation:
        if self.policy is None:
            raise RuntimeError("TransformersEngine.generate called before bind(policy).")
        tok = self.tokenizer
        pad_id = tok.pad_token_id
        eos = tok.eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos))
        ids, mask = pad_left(prompt_ids, pad_id)
        device = next(self.policy.parameters()).device
        s = self.sampling
        limit = s.max_new_tokens if max_new_tokens is None else max(1, min(s.max_new_tokens, max(max_new_tokens)))
        # every sampling parameter comes from SamplingConfig: top_k=0 switches off transformers' default of 50
        sample = {"do_sample": True, "temperature": s.temperature, "top_p": 1.0, "top_k": 0}
        kwargs = {"do_sample": False} if greedy else sample
        synced = self.synced_gpus
        if synced is None:
            synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            synced = synced and is_sharded(self.policy)
        hf_model = transformers_model(self.policy)  # under a peft wrapper, the model generate() configures from
        was_training, checkpoint_config = self.policy.training, hf_model.generation_config
        self.policy.eval()
        # a checkpoint's generation_config.json (repetition_penalty, min_p, suppress_tokens, ...) fills every
        # parameter generate() is not given: swap in transformers' neutral defaults so that the rollouts come
        # from the distribution the trainer's log-probs describe (softmax(logits / temperature))
        hf_model.generation_config = GenerationConfig()
        chunks, logprob_chunks, route_chunks = [], [], []
        step = self.batch_size or len(prompt_ids)
        routes = None if greedy else self._route_recorder()  # greedy decoding evaluates, nothing trains on it
        stop = self.stop_requested
        stopping = StoppingCriteriaList([_StopRequested(stop)]) if stop is not None else None
        try:
            for start in range(0, len(prompt_ids), step):
                recorder = SampledTokenLogprobs(s.temperature)
                with routes.capture() if routes is not None else contextlib.nullcontext():
                    out = self.policy.generate(
                        input_ids=ids[start : start + step].to(device),
                        attention_mask=mask[start : start + step].to(device).long(),
                        max_new_tokens=limit,
                        num_return_sequences=num_samples,
                        pad_token_id=pad_id,
                        eos_token_id=eos_ids.tolist(),
                        use_cache=self.use_cache,
                        synced_gpus=synced,
                        logits_processor=LogitsProcessorList([] if greedy else [recorder]),
                        stopping_criteria=stopping,
                        **kwargs,
                    )
                if stop is not None and stop():  # cut short: these sequences are not what sampling would give
                    raise GenerationStopped("generation stopped on request; its partial rollouts were dropped")
                chunks.append(out[:, ids.shape[1] :].cpu())
                if routes is not None:
                    route_chunks.append(routes.result(out.shape[1]))
                if not greedy:
                    logprob_chunks.append(recorder.finish(out))
        finally:
            self.policy.train(was_training)
            hf_model.generation_config = checkpoint_config
        width = max(c.shape[1] for c in chunks)
        response = torch.cat([nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])
        response_mask, truncated = response_mask_until_eos(response, eos_ids, limit)
        if max_new_tokens is not None:  # each row's own limit (what is left of a trajectory's token budget)
            rows = [m for m in max_new_tokens for _ in range(num_samples)]
            is_eos = torch.isin(response, eos_ids)
            response_mask, truncated = limit_rows(response_mask, truncated, rows, is_eos)
        response = response.masked_fill(~response_mask, pad_id)
        logprobs = None
        if logprob_chunks:
            logprobs = torch.cat([nn.functional.pad(c, (0, width - c.shape[1])) for c in logprob_chunks])
            logprobs = logprobs.masked_fill(~response_mask, 0.0)
        generation = Generation(
            prompt_ids=ids.repeat_interleave(num_samples, 0),
            prompt_mask=mask.repeat_interleave(num_samples, 0),
            response_ids=response,
            response_mask=response_mask,
            truncated=truncated,
            logprobs=logprobs,
        )
        if route_chunks:
            generation.routes, generation.route_mask = _join_routes(route_chunks, generation)
        return generation

    def _route_recorder(self) -> GenerationRoutes | None:
        if not self.return_routes:
            return None
        layout = moe_layout(self.policy.config)
        if layout is None:
            raise ValueError("MoE routes were requested, but the policy is not a mixture of experts.")
        return GenerationRoutes(self.policy, layout.num_experts)


def _join_routes(chunks: list[tuple[Tensor, Tensor]], generation: Generation) -> tuple[Tensor, Tensor]:
    """One (N, L, P+T, k) route tensor from the ``generate`` calls' own, and its mask: columns a forward ran on
    real tokens (the prompt's, and the response's up to its end)."""
    width = generation.prompt_ids.shape[1] + generation.response_ids.shape[1]
    routes = torch.cat([nn.functional.pad(r, (0, 0, 0, width - r.shape[2])) for r, _ in chunks])
    ran = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for _, m in chunks])
    real = torch.cat([generation.prompt_mask, generation.response_mask], dim=1)
    return routes, ran & real
