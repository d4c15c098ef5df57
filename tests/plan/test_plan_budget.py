"""The budget's terms on small constructed runs whose numbers are worked out by hand."""

import dataclasses

import pytest
from lightning.pytorch.strategies import StrategyRegistry
from support import nested

from gspo_lightning.plan.activations import Widths, train_micro_batch
from gspo_lightning.plan.architecture import Architecture
from gspo_lightning.plan.budget import engine_terms, shapes, state_terms, update_terms
from gspo_lightning.plan.run import GIB, parse_memory, run_spec

# a dense model of exactly 1,000,000 parameters: H 64, L 2, V 1,000 (numbers chosen for the arithmetic)
ARCH = Architecture(
    name="test", source="constructed", model_type="qwen3", vocab_size=1_000, hidden_size=64, num_layers=2,
    intermediate_size=128, q_dim=64, kv_dim=32, head_dim=16, num_heads=4, qk_norm=False, num_experts=0,
    experts_per_token=0, expert_size=0, moe_layers=0, tied=True, params=1_000_000, layer_params=100_000,
    layer_linear_params=99_000, root_params=800_000, largest_param=8_192, config_dtype=None,
)  # fmt: skip
FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {}}


def spec(trainer=None, model=None, data=None):
    """A RunSpec from a partial fit configuration: 8 prompts x 2 samples, 4 + 4 tokens each, 1 mini-batch."""
    data = {"prompts_per_step": 8, "num_samples": 2, "max_prompt_length": 4, "sampling": {"max_new_tokens": 4},
            "engine": {"class_path": "gspo_lightning.engines.TransformersEngine"}, **(data or {})}  # fmt: skip
    model = {"model": "test", "mini_batches": 1, **(model or {})}
    config = {"trainer": {"accelerator": "cpu", **(trainer or {})}, "model": nested("model", model)}
    return run_spec({**config, "data": nested("data", data)})


def terms(run, adapters=0):
    return {t.name: t for t in state_terms(run, ARCH, adapters, shapes(run, ARCH))}


def test_ddp_replicates_and_fsdp2_over_8_divides_by_8():
    ddp = terms(spec({"devices": 8, "strategy": "ddp"}))
    fsdp = terms(spec({"devices": 8, "strategy": FSDP2}))
    # float32: 1e6 x 4 B weights; AdamW 2 x 4 B per parameter; DDP adds its gradient buckets (a second copy)
    assert ddp["policy weights"].update == 4_000_000 and ddp["optimizer states"].update == 8_000_000
    assert ddp["gradients"].update == 2 * 4_000_000
    assert ddp["gradients"].generation == 4_000_000  # the reducer's buckets live as long as DDP does
    assert ddp["gradients"].knob == "shard"
    assert fsdp["policy weights"].update == 4_000_000 / 8
    assert fsdp["optimizer states"].update == 8_000_000 / 8
    # 16 sequences / 8 ranks = 2 per rank, one mini-batch, one micro-batch: the gradients are reduce-scattered
    assert fsdp["gradients"].update == 4_000_000 / 8


def test_ddp_gradients_as_bucket_views_are_one_copy_in_both_phases():
    strategy = {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                "init_args": {"gradient_as_bucket_view": True}}  # fmt: skip
    grads = terms(spec({"devices": 2, "strategy": strategy}))["gradients"]
    assert grads.generation == grads.update == 4_000_000


def test_fsdp2_reduce_scatters_every_micro_batch_unless_told_not_to():
    run = spec({"devices": 8, "strategy": FSDP2}, {"micro_batch_size": 1})  # 2 micro-batches per rank
    assert shapes(run, ARCH).micro_batches == 2
    grads = terms(run)["gradients"]  # sync_every_micro_batch: None -> sharded strategies sync every one
    assert grads.update == 4_000_000 / 8 and grads.generation == 0  # set to None after the optimizer step
    run = spec({"devices": 8, "strategy": FSDP2}, {"micro_batch_size": 1, "sync_every_micro_batch": False})
    grads = terms(run)["gradients"]
    assert grads.update == 1_000_000 * 4 and grads.generation == 0
    assert grads.knob == "accumulation"


def test_lora_keeps_gradients_and_optimizer_states_of_the_adapters_only_and_no_reference():
    run = dataclasses.replace(spec(model={"kl_coef": 0.04}), peft=object())
    t = terms(run, adapters=10_000)
    assert t["policy weights"].update == 4_000_000 + 10_000 * 4  # frozen base + fp32 adapters
    assert t["gradients"].update == 10_000 * 4
    assert t["optimizer states"].update == 10_000 * 2 * 4
    assert "reference model" not in t  # the policy with its adapters off


def test_a_kl_term_loads_a_reference_sharded_only_by_fsdp2():
    assert terms(spec(model={"kl_coef": 0.04}))["reference model"].update == 4_000_000
    assert terms(spec({"devices": 8, "strategy": FSDP2}, {"kl_coef": 0.04}))["reference model"].update == 500_000
    assert "reference model" not in terms(spec())


def test_deepspeed_zero3_offload_moves_weights_and_states_to_the_host():
    strategy = {"class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
                "init_args": {"stage": 3, "offload_optimizer": True, "offload_parameters": True}}  # fmt: skip
    t = terms(spec({"devices": 4, "strategy": strategy, "precision": "bf16-mixed"}))
    assert t["policy weights"].update == 0 and t["optimizer states"].update == 0
    assert t["gradients"].update == 1_000_000 * 2 / 4  # bf16 gradients, partitioned over 4


def test_gradient_checkpointing_lowers_the_activations():
    w = Widths(4, 4, 4)
    full = train_micro_batch(ARCH, w, tokens=4_096, response=2_048, chunk=256, checkpointing=False, grad_bytes=4)
    ckpt = train_micro_batch(ARCH, w, tokens=4_096, response=2_048, chunk=256, checkpointing=True, grad_bytes=4)
    assert ckpt.saved < full.saved / 4
    # checkpointed, a layer keeps its input: 2 layers x 4,096 tokens x 64 x 4 B = 2 MiB, + model-level tensors
    assert ckpt.saved >= 2 * 4_096 * 64 * 4
    assert ckpt.backward > full.backward  # the recomputed layer


def test_the_head_is_five_fp32_chunk_logits_and_a_weight_gradient():
    peak = train_micro_batch(ARCH, Widths(4, 4, 4), 1_024, 512, chunk=256, checkpointing=False, grad_bytes=4)
    assert peak.head == 5 * 256 * 1_000 * 4 + 1_000 * 64 * 4


def test_vllm_reserves_its_share_while_generating_and_sleeps_through_the_update():
    engine = {"class_path": "gspo_lightning.engines.VLLMEngine", "init_args": {"gpu_memory_utilization": 0.25}}
    run = spec({"accelerator": "gpu"}, data={"engine": engine})
    awake = engine_terms(run, ARCH, shapes(run, ARCH), 80 * GIB)[0]
    assert awake.generation == 20 * GIB and awake.update == 20 * GIB
    engine["init_args"]["enable_sleep_mode"] = True
    run = spec({"accelerator": "gpu"}, data={"engine": engine})
    asleep = engine_terms(run, ARCH, shapes(run, ARCH), 80 * GIB)[0]
    assert asleep.generation == 20 * GIB and asleep.update == 0


def test_asynchronous_rollouts_hold_the_engine_through_the_update_and_a_weight_copy():
    """data.max_staleness > 0: generation runs during the update, so the engine's memory counts in both phases, and
    TransformersEngine generates from a copy of the weights (1e6 x 4 B); served engines hold nothing here."""
    sync = {t.name: t for t in engine_terms(spec(), ARCH, shapes(spec(), ARCH), 80 * GIB)}
    run = spec(data={"max_staleness": 1})
    stale = {t.name: t for t in engine_terms(run, ARCH, shapes(run, ARCH), 80 * GIB)}
    kv = "KV cache (generate)"
    assert sync[kv].update == 0 and stale[kv].update == stale[kv].generation == sync[kv].generation > 0
    copy = stale["engine's copy of the weights"]
    assert copy.generation == copy.update == 4_000_000
    served = spec(data={"max_staleness": 1, "engine": {"class_path": "gspo_lightning.engines.VLLMServerEngine"}})
    assert [(t.name, t.generation, t.update) for t in engine_terms(served, ARCH, shapes(served, ARCH), GIB)] == [
        ("vLLM servers", 0.0, 0.0)
    ]


def test_token_budget_micro_batches():
    # 8 + 8 tokens per sequence, a 40-token budget: 2 sequences (32 tokens) per micro-batch when all are full
    # length, but shorter ones can fill the budget: at most 40 tokens; 16 sequences -> 8 micro-batches
    run = spec(model={"micro_batch_tokens": 40}, data={"max_prompt_length": 8, "sampling": {"max_new_tokens": 8}})
    s = shapes(run, ARCH)
    assert (s.length, s.per_micro, s.micro_tokens, s.micro_batches) == (16, 2, 40, 8)
    act = {t.name: t for t in update_terms(run, ARCH, s)}["activations"]
    assert act.update > 0 and act.generation == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("80GiB", 80 * GIB), ("80GB", 80 * 10**9), ("81920MiB", 80 * GIB), ("1.5 TiB", 1.5 * 2**40), ("512mb", 512e6)],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80", "eighty GiB", "80 parsecs", "-1GiB", "0GiB", "0.5B", "infGiB", "nanGiB"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match=r"--device_memory .*: give a finite size of at least 1 byte with a unit"):
        parse_memory(text)


def test_an_unmodelled_strategy_is_one_line():
    with pytest.raises(ValueError, match="cannot import 'my.CustomStrategy'"):
        spec({"devices": 2, "strategy": {"class_path": "my.CustomStrategy"}})
    with pytest.raises(ValueError, match="the planner models"):
        spec({"devices": 2, "strategy": {"class_path": "lightning.pytorch.strategies.XLAStrategy"}})


def test_a_strategy_name_fit_refuses_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match=r"trainer.strategy='fsdp3' .* auto, ddp, .*fsdp_cpu_offload") as err:
        spec({"devices": 2, "strategy": "fsdp3"})
    assert "\n" not in str(err.value)


KINDS = {
    "DDPStrategy": "ddp",
    "DeepSpeedStrategy": "deepspeed",
    "FSDPStrategy": "fsdp",
    "SingleDeviceStrategy": "single",
}


@pytest.mark.parametrize("name", StrategyRegistry.available_strategies())
def test_every_registered_strategy_name_plans_as_its_class(name):
    devices = 1 if name.startswith("single") else 2
    cls = StrategyRegistry[name]["strategy"].__name__
    if cls not in KINDS:  # XLA / TPU
        with pytest.raises(ValueError, match=f"the planner models .* not {cls}"):
            spec({"devices": devices, "strategy": name})
        return
    assert spec({"devices": devices, "strategy": name}).strategy.kind == KINDS[cls]
    assert spec({"devices": devices, "strategy": name.upper()}).strategy.kind == KINDS[cls]  # fit lowercases


def test_registered_deepspeed_and_fsdp_names_carry_their_arguments():
    offload = spec({"devices": 4, "strategy": "deepspeed_stage_3_offload"}).strategy
    assert offload.shard_params and offload.offload_params and offload.offload_optimizer
    assert not spec({"devices": 4, "strategy": "deepspeed"}).strategy.shard_params  # stage 2 by default
    assert spec({"devices": 4, "strategy": "fsdp_cpu_offload"}).strategy.offload_optimizer
