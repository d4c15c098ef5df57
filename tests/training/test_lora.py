"""LoRA through peft: adapters only train, the reference is the policy with its adapters off, rollout engines
see the adapted policy, exports and resumes keep the adapters."""

import copy
from pathlib import Path

import peft
import pytest
import torch
from support import addition_datamodule, built_module, tiny_args
from transformers import AutoModelForCausalLM

from gspo_lightning.adapters import AdapterDisabled, apply_peft, hf_name, merged_weights, transformers_model
from gspo_lightning.cli import CONFIG_DIR, cli_main
from gspo_lightning.engines.vllm_weights import iter_full_weights
from gspo_lightning.rollout import PolicyLink
from gspo_lightning.training.logprobs import response_logprobs

LORA = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
ATTENTION = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _lora_module(tiny_path, config=LORA, **kwargs):
    module = built_module(tiny_path, peft=config, **kwargs)
    with torch.no_grad():  # B = 0 at init makes the adapted model the base one: move the adapters off zero
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return module


def _logprobs(model, ids, chunk_size=256):
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        return response_logprobs(model, ids, mask, 5, chunk_size=chunk_size).logprobs


IDS = torch.randint(1, 12, (3, 10), generator=torch.Generator().manual_seed(0))


def test_only_the_adapters_are_optimised(tiny_path):
    module = built_module(tiny_path, peft=LORA)
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable), "all-linear reaches the fused experts (peft parameter adapters)"
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer = optimizer[0] if isinstance(optimizer, list) else optimizer
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.policy.parameters() if p.requires_grad}


def test_the_reference_is_the_policy_with_its_adapters_off(tiny_path):
    module = _lora_module(tiny_path, kl_coef=0.05)
    assert isinstance(module.reference, AdapterDisabled) and module.reference.policy is module.policy
    # no second set of weights: the reference's parameters are the policy's own
    assert {id(p) for p in module.reference.parameters()} == {id(p) for p in module.policy.parameters()}
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    torch.testing.assert_close(_logprobs(module.reference, IDS), _logprobs(base, IDS), rtol=0, atol=1e-6)
    assert not torch.allclose(_logprobs(module.policy, IDS), _logprobs(base, IDS), atol=1e-3), "adapters act"
    assert all(p.requires_grad for n, p in module.policy.named_parameters() if ".lora_" in n), "still trainable"


@pytest.mark.parametrize("config", [LORA, ATTENTION], ids=["all-linear", "attention"])
def test_merged_weights_are_the_adapted_model(tiny_path, config):
    module = _lora_module(tiny_path, config)
    merged = dict(merged_weights(module.policy, module.policy.state_dict()))
    plain = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logprobs(plain, IDS), _logprobs(module.policy, IDS), rtol=0, atol=1e-4)
    assert dict(iter_full_weights(module.policy)).keys() == merged.keys(), "what a vLLM engine receives"


def test_peft_names_map_to_the_checkpoints():
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert hf_name("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj") == (
        "model.layers.0.mlp.experts.gate_up_proj"
    )
    assert hf_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None


def test_the_embedded_engine_samples_from_the_adapted_policy(tiny_path):
    module = _lora_module(tiny_path)
    hf = transformers_model(module.policy)
    hf.generation_config.repetition_penalty = 5.0  # a checkpoint setting the engine must not apply
    dm = addition_datamodule(tiny_path)
    dm.connect(PolicyLink(module.policy))
    torch.manual_seed(0)
    batch = dm.next_rollout()
    assert hf.generation_config.repetition_penalty == 5.0, "restored after generating"
    trainer_view = response_logprobs(
        module.policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1]
    ).logprobs.detach()
    mask = batch.response_mask
    torch.testing.assert_close(batch.rollout_logprobs[mask], trainer_view[mask], rtol=0, atol=1e-5)


VARIED_REWARD = ["--data.rewards", '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]']


def _fit(root: Path, *extra: str, max_steps: int):
    lora = ["--config", str(CONFIG_DIR / "lora.yaml"), *VARIED_REWARD, "--trainer.callbacks+=HFExport"]
    args = tiny_args(root, *extra, max_steps=max_steps)
    return cli_main(["fit", *args[:2], *lora, *args[2:]])


def _last(root: Path) -> dict:
    return torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)


def test_resume_restores_the_adapters_and_their_optimizer_state_and_exports_them(tmp_path, tiny_path):
    straight = _fit(tmp_path / "straight", max_steps=6)
    _fit(tmp_path / "first", max_steps=2)
    first = tmp_path / "first" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    _fit(tmp_path / "resumed", "--ckpt_path", str(first), max_steps=6)
    expected, got = _last(tmp_path / "straight"), _last(tmp_path / "resumed")
    adapters = [n for n in expected["state_dict"] if ".lora_" in n]
    initial = built_module(tiny_path, peft=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    assert any(not torch.equal(expected["state_dict"][n], initial.state_dict()[n]) for n in adapters), "trained"
    for name in adapters:
        torch.testing.assert_close(got["state_dict"][name], expected["state_dict"][name], rtol=0, atol=0, msg=name)
    states = expected["optimizer_states"][0]["state"], got["optimizer_states"][0]["state"]
    assert states[0].keys() == states[1].keys() and len(states[0]) == len(adapters)
    for key in states[0]:
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states[1][key][field], states[0][key][field], rtol=0, atol=0)
    # HFExport: the adapter folder loads on the base model and equals the trained policy
    export = tmp_path / "straight" / "lightning_logs" / "version_0" / "hf_export" / "final"
    assert (export / "adapter_config.json").exists()
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), export)
    torch.testing.assert_close(_logprobs(loaded, IDS), _logprobs(straight.model.policy, IDS), rtol=0, atol=1e-5)


def test_export_can_merge_the_adapters(tmp_path, tiny_path):
    cli = _fit(tmp_path, "--trainer.callbacks.merge_adapters", "true", max_steps=2)
    merged = tmp_path / "lightning_logs" / "version_0" / "hf_export" / "final" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(_logprobs(model, IDS), _logprobs(cli.model.policy, IDS), rtol=0, atol=1e-4)


def test_gradient_checkpointing_reaches_the_adapters(tiny_path, rollout):
    from support import prepared

    from gspo_lightning.components.aggregation import LossCounts

    grads = {}
    for checkpointing in (False, True):
        module = _lora_module(tiny_path, gradient_checkpointing=checkpointing, mini_batches=2)
        batch = prepared(module, rollout)
        batch.advantages = torch.linspace(-1, 1, len(batch))
        loss, _ = module.policy_loss(module.policy, batch, LossCounts.from_mask(batch.response_mask))
        loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads[True].values())
    assert sum(float(g.abs().sum()) for g in grads[True].values()) > 0
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _dense(tied: bool = False, **overrides):
    """A tiny random dense Qwen3 (vocabulary 50), its embeddings tied or not."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def _off_zero(policy) -> None:
    """Adapters that act: noise on every ``lora_B`` (weights and biases) and on the modules_to_save copies."""
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.5)


HEAD_ADAPTERS = {
    "target_modules": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
    "modules_to_save": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("where", list(HEAD_ADAPTERS))
def test_the_reference_switches_off_an_adapted_output_layer_under_the_chunked_head(where):
    # the chunked head keeps the real lm_head outside the module tree, where peft's disable_adapter() does not reach
    base = _dense()
    policy = apply_peft(copy.deepcopy(base), copy.deepcopy(HEAD_ADAPTERS[where]))
    _off_zero(policy)
    reference = AdapterDisabled(policy)
    for chunk_size in (None, 2, 256):
        expected = _logprobs(base, IDS, chunk_size)
        torch.testing.assert_close(_logprobs(reference, IDS, chunk_size), expected, rtol=0, atol=1e-6)
        assert (_logprobs(policy, IDS, chunk_size) - expected).abs().max() > 1e-2, "the head's adapter acts"
    adapters = [p for n, p in policy.named_parameters() if "lora_" in n or ".modules_to_save." in n]
    assert adapters and all(p.requires_grad for p in adapters), "switched back on, still trainable"


def test_lora_bias_is_merged_as_peft_merges_it():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True)
    policy = apply_peft(_dense(attention_bias=True), config)
    _off_zero(policy)
    merged = dict(merged_weights(policy, policy.state_dict()))
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("where", list(HEAD_ADAPTERS))
def test_adapting_the_output_layer_of_a_tied_model_is_refused(where):
    # vLLM skips lm_head.weight for tied embeddings and a merged export ties it back: the adapter would be lost
    with pytest.raises(ValueError, match=r"tie_word_embeddings.*lm_head"):
        apply_peft(_dense(tied=True), copy.deepcopy(HEAD_ADAPTERS[where]))


def _router_weights(merged: dict, plain: dict) -> dict[str, bool]:
    """For each router weight of the tiny MoE (``mlp.gate.weight``): whether ``merged`` holds the base one."""
    names = [n for n in plain if n.endswith("mlp.gate.weight")]
    assert names
    return {n: torch.equal(merged[n], plain[n]) for n in names}


def test_all_linear_leaves_the_routers_as_they_are(tiny_path, tmp_path):
    module = _lora_module(tiny_path)  # all-linear
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in trainable) and not any(".mlp.gate." in n for n in trainable)
    plain = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    merged = dict(merged_weights(module.policy, module.policy.state_dict()))
    assert all(_router_weights(merged, plain).values()), "the merged routers are the base ones"
    # the saved adapter says so too: loaded back, it adapts no router and is the trained policy
    module.policy.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), tmp_path)
    assert not any(".mlp.gate." in n for n, _ in loaded.named_parameters() if ".lora_" in n)
    torch.testing.assert_close(_logprobs(loaded, IDS), _logprobs(module.policy, IDS), rtol=0, atol=1e-6)


def test_naming_the_router_adapts_it(tiny_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate"])
    module = _lora_module(tiny_path, config)
    assert any(".mlp.gate." in n for n, p in module.policy.named_parameters() if p.requires_grad)
    plain = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    merged = dict(merged_weights(module.policy, module.policy.state_dict()))
    assert not any(_router_weights(merged, plain).values()), "every router adapted"
