"""The planner's model numbers: carried config.json values, the demo spec, local folders, LoRA adapters."""

import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM, Qwen3Config

from gspo_lightning.demo.model import BUILTINS, build_model
from gspo_lightning.plan.architecture import adapter_params, demo_config, find_config, load_architecture


def test_qwen3_0_6b_from_the_carried_numbers():
    arch = load_architecture("Qwen/Qwen3-0.6B")
    assert arch.source == "carried config.json numbers"
    # embedding 151,936 x 1,024 = 155,582,464 (tied: the head is the same weight)
    # a layer: q 1024x2048 + k, v 1024x1024 each + o 2048x1024 = 6,291,456; MLP 3 x 1024x3072 = 9,437,184;
    # norms 2 x 1024 + q_norm 128 + k_norm 128 = 2,304 -> 15,730,944; 28 layers = 440,466,432; final norm 1,024
    assert arch.layer_params == 15_730_944
    assert arch.params == 155_582_464 + 28 * 15_730_944 + 1_024 == 596_049_920
    assert arch.tied and arch.qk_norm and not arch.is_moe
    assert (arch.q_dim, arch.kv_dim, arch.head_dim) == (2048, 1024, 128)


def test_qwen3_30b_a3b_from_the_carried_numbers():
    arch = load_architecture("Qwen/Qwen3-30B-A3B")
    assert (arch.num_experts, arch.experts_per_token, arch.expert_size, arch.moe_layers) == (128, 8, 768, 48)
    # untied: embedding and head are 151,936 x 2,048 each, + the final norm
    assert arch.root_params == 2 * 151_936 * 2_048 + 2_048
    # the experts: 128 x (2 x 768 x 2048 gate-up + 2048 x 768 down) = 603,979,776 per layer
    assert arch.layer_params > 128 * 3 * 768 * 2048
    assert round(arch.params / 1e9, 2) == 30.53  # "30.5B total parameters" on the model card


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_spec_counts_what_build_model_builds(name):
    arch = load_architecture(f"builtin:{name}")
    spec = BUILTINS[name]
    built = build_model(spec, demo_config(spec).vocab_size, 0, 1, 2)
    assert arch.params == sum(p.numel() for p in built.parameters())
    assert arch.num_experts == spec.num_experts and arch.num_layers == spec.num_layers


def test_local_folder_is_read_first(tmp_path):
    config = Qwen3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    arch = load_architecture(str(tmp_path))
    assert arch.source.startswith("local folder")
    assert arch.params == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert arch.num_layers == 3 and not arch.tied


def test_an_unknown_model_offline_is_one_line_naming_the_fix():
    with pytest.raises(ValueError, match="not in the Hugging Face cache") as info:
        find_config("nobody/no-such-model-xyz")
    assert "hf download nobody/no-such-model-xyz config.json" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no such built-in"):
        find_config("builtin:nope")


def test_lora_adapters_are_counted_on_the_meta_device():
    # demo model: hidden 64, q 4 x 32 = 128, k and v 2 x 32 = 64; r = 2 on q_proj and v_proj of 2 layers:
    # q: 2 x (64 + 128) = 384, v: 2 x (64 + 64) = 256 -> 640 per layer, 1,280 in all
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    assert adapter_params("builtin:tiny-qwen3-moe-random", lora) == 1_280
