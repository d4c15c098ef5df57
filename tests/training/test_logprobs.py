"""The trainer's log-probs agree with the engine's greedy choices, with left padding and with temperature."""

import pytest
import torch

from gspo_lightning.engines import SamplingConfig, TransformersEngine
from gspo_lightning.training.logprobs import position_ids_from_mask, response_logprobs


def _engine(model, tokenizer):
    engine = TransformersEngine()
    engine.configure(SamplingConfig(max_new_tokens=6), tokenizer)
    engine.bind(model)
    return engine


def test_trainer_logprobs_match_generation_scores(tiny_model, tiny_tokenizer):
    # greedy tokens are the argmax of the logits generate saw: the trainer's log-probs must pick them out
    prompts = [tiny_tokenizer("12+34=")["input_ids"], tiny_tokenizer("7+8=")["input_ids"]]
    gen = _engine(tiny_model, tiny_tokenizer).generate(prompts, 1, greedy=True)
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    attn = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    tiny_model.eval()
    with torch.no_grad():
        out = response_logprobs(tiny_model, ids, attn, gen.response_ids.shape[1], with_entropy=True)
        logits = tiny_model(
            input_ids=ids, attention_mask=attn.long(), position_ids=(attn.long().cumsum(-1) - 1).clamp(min=0)
        ).logits
    t = gen.response_ids.shape[1]
    best = logits[:, -(t + 1) : -1].log_softmax(-1).max(-1).values
    torch.testing.assert_close(out.logprobs[gen.response_mask], best[gen.response_mask], rtol=1e-4, atol=1e-4)
    assert (out.entropy >= 0).all()


def test_left_padding_and_temperature(tiny_model, tiny_tokenizer):
    tiny_model.eval()
    ids = torch.tensor([tiny_tokenizer("12+34=57")["input_ids"]])
    attn = torch.ones_like(ids, dtype=torch.bool)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    padded_attn = torch.cat([torch.zeros(1, 3, dtype=torch.bool), attn], 1)
    with torch.no_grad():
        a = response_logprobs(tiny_model, ids, attn, 2).logprobs
        b = response_logprobs(tiny_model, padded, padded_attn, 2).logprobs
        hot = response_logprobs(tiny_model, ids, attn, 2, temperature=2.0).logprobs
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, hot)


def _dense(tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config)


def _padded_batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(1, vocab, (3, 9))
    attn = torch.ones(3, 9, dtype=torch.bool)
    attn[0, :2] = False  # left-padded prompt
    attn[1, -2:] = False  # right-padded response
    attn[2, -4:] = False
    return ids, attn


@pytest.mark.parametrize("model_kind", ["moe", "dense-tied", "dense-untied"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunked_head_equals_full_logits_in_values_and_gradients(tiny_model, model_kind, chunk_size):
    model = {"moe": lambda: tiny_model, "dense-tied": lambda: _dense(True), "dense-untied": lambda: _dense(False)}
    model = model[model_kind]().train()
    ids, attn = _padded_batch(model.config.vocab_size)
    results = []
    for size in (None, chunk_size):
        model.zero_grad()
        out = response_logprobs(
            model, ids, attn, 5, temperature=0.7, with_entropy=True, entropy_grad=True, chunk_size=size,
            output_router_logits=model_kind == "moe",
        )  # fmt: skip
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.logprobs, out.entropy, grads, out.aux_loss))
    (lp_full, ent_full, g_full, aux_full), (lp, ent, g, aux) = results
    torch.testing.assert_close(lp, lp_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, ent_full, rtol=1e-5, atol=1e-6)
    # float32 sums in another order: absolute error relative to the largest gradient (the tied embedding's, ~9)
    torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-6 * max(1.0, g_full.abs().max().item()))
    assert (lp[~attn[:, -5:]] == 0).all() and (ent[~attn[:, -5:]] == 0).all()
    if model_kind == "moe":
        torch.testing.assert_close(aux, aux_full)
    assert "lm_head.weight" in dict(model.named_parameters()) or model_kind != "dense-untied"  # restored


def test_the_head_never_sees_more_than_a_chunk_of_tokens(tiny_model):
    ids, attn = _padded_batch(tiny_model.config.vocab_size)
    rows = []
    head = tiny_model.get_output_embeddings()
    hook = head.register_forward_hook(
        lambda module, inputs, output: rows.append(output.reshape(-1, output.shape[-1]).shape[0])
    )
    out = response_logprobs(tiny_model, ids, attn, 5, with_entropy=True, chunk_size=4)
    out.logprobs.sum().backward()  # the recomputation in backward is chunked too
    hook.remove()
    assert rows and max(rows) <= 4
    assert sum(rows) == 2 * int(attn[:, -5:].sum())  # real response tokens only, forward and backward
    assert tiny_model.get_output_embeddings() is head  # the model is left as it was


@pytest.mark.parametrize("policy_checkpointing", [False, True])
def test_backward_never_sets_the_process_random_state(tiny_path, monkeypatch, policy_checkpointing):
    """The chunked head's (and the policy's) recomputation in backward sets no RNG state: with dropout off there is
    nothing to replay, and setting the process's generator mid-backward would shift the samples of a rollout thread
    drawing from it at that moment (asynchronous rollouts, ``data.max_staleness``)."""
    from gspo_lightning.training.policy import load_policy

    model = load_policy(str(tiny_path), gradient_checkpointing=policy_checkpointing)
    ids, attn = _padded_batch(model.config.vocab_size)
    sets = []
    real_set = torch.set_rng_state
    monkeypatch.setattr(torch, "set_rng_state", lambda state: (sets.append(1), real_set(state)))
    monkeypatch.setattr(torch.random, "set_rng_state", torch.set_rng_state)
    out = response_logprobs(model, ids, attn, 5, with_entropy=True, chunk_size=4)
    out.logprobs.sum().backward()
    assert not sets, f"backward set the RNG state {len(sets)} times"


def test_models_with_transformed_logits_fall_back_to_their_own_logits(caplog):
    model = _dense(False)
    model.config.final_logit_softcapping = 30.0  # the chunked head would skip the soft-capping
    ids, attn = _padded_batch(model.config.vocab_size)
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape))
    with caplog.at_level("WARNING"):
        response_logprobs(model, ids, attn, 5, chunk_size=2)
    hook.remove()
    assert rows == [torch.Size([3, 6, 50])]  # one call over the whole (N, T+1) block: the model's own logits
    assert "computing full-vocabulary logits instead" in caplog.text


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("model_kind", ["moe", "dense-tied"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_padding_free_packing_equals_the_padded_path(tiny_model, model_kind, chunk_size, attn_impl):
    # one row of real tokens, position ids restarting per sequence: same log-probs, entropies, gradients, aux loss
    model = tiny_model if model_kind == "moe" else _dense(True)
    model.config._attn_implementation = attn_impl
    model.train()
    ids, attn = _padded_batch(model.config.vocab_size)
    results = []
    for packed in (False, True):
        model.zero_grad()
        out = response_logprobs(
            model, ids, attn, 5, temperature=0.7, with_entropy=True, entropy_grad=True, chunk_size=chunk_size,
            output_router_logits=model_kind == "moe", padding_free=packed,
        )  # fmt: skip
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out, grads))
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed.logprobs, padded.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.entropy, padded.entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-5)
    if model_kind == "moe":
        torch.testing.assert_close(packed.aux_loss, padded.aux_loss, rtol=1e-5, atol=1e-6)
        real = attn.reshape(-1)
        for a, b, mask in zip(packed.router_logits, padded.router_logits, [packed.router_token_mask] * 99):
            assert a.shape[0] == int(real.sum()) == int(mask.sum())  # only real tokens reached the routers
            torch.testing.assert_close(a, b[real], rtol=1e-5, atol=1e-5)


def test_packing_really_isolates_sequences(tiny_model):
    # without restarting position ids (one long sequence) the log-probs would change: the test can fail
    tiny_model.eval()
    ids, attn = _padded_batch(tiny_model.config.vocab_size)
    with torch.no_grad():
        padded = response_logprobs(tiny_model, ids, attn, 5).logprobs
        packed = response_logprobs(tiny_model, ids, attn, 5, padding_free=True).logprobs
        real = attn.bool()
        flat = response_logprobs(
            tiny_model, ids[real][None], torch.ones(1, int(real.sum()), dtype=torch.bool), int(real.sum()) - 1
        ).logprobs  # the packed row as one causal sequence: later sequences attend to earlier ones
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert int(attn[2, -5:].sum()) == 1  # the last sequence's one response token ends the packed row
    assert abs(float(flat[0, -1] - padded[2, 0])) > 1e-3


def _scaled(logits):
    return 2.5 * logits


def _softcapped(logits):
    return 0.5 * torch.tanh(logits / 0.5)


@pytest.mark.parametrize("transform", [_scaled, _softcapped], ids=["scaled", "softcapped"])
def test_a_forward_that_transforms_its_logits_falls_back_to_them_at_setup(tiny_path, monkeypatch, caplog, transform):
    # no config attribute says so: only the model's forward transforms its logits, after the output projection
    from support import built_module
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    forward = Qwen3MoeForCausalLM.forward

    def transformed(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = transform(out.logits)
        return out

    monkeypatch.setattr(Qwen3MoeForCausalLM, "forward", transformed)
    with caplog.at_level("WARNING", logger="gspo_lightning.training.logprobs"):
        module = built_module(tiny_path, kl_coef=0.05)  # the reference is a second copy: it falls back too
        ids, attn = _padded_batch(module.policy.config.vocab_size)
        for model in (module.policy, module.reference):
            with torch.no_grad():
                chunked = response_logprobs(model, ids, attn, 5, chunk_size=module.options.batching.logprob_chunk_size)
                full = response_logprobs(model, ids, attn, 5, chunk_size=None)
                own = model(input_ids=ids, attention_mask=attn.long(), position_ids=position_ids_from_mask(attn)).logits
            expected = own[:, -6:-1].float().log_softmax(-1).gather(-1, ids[:, -5:, None]).squeeze(-1)
            torch.testing.assert_close(chunked.logprobs, expected.masked_fill(~attn[:, -5:], 0), rtol=1e-5, atol=1e-6)
            assert torch.equal(chunked.logprobs, full.logprobs), "the full head, not a chunked approximation"
    lines = [r.getMessage() for r in caplog.records if "logprob_chunk_size" in r.getMessage()]
    assert len(lines) == 1, lines  # one line, naming the option


def test_an_ordinary_model_keeps_its_chunked_head_after_the_setup_check(tiny_path, caplog):
    from support import built_module

    with caplog.at_level("WARNING", logger="gspo_lightning.training.logprobs"):
        module = built_module(tiny_path, kl_coef=0.05)
        ids, attn = _padded_batch(module.policy.config.vocab_size)
        for model in (module.policy, module.reference):
            shapes = []
            hook = model.get_output_embeddings().register_forward_hook(
                lambda m, i, o, seen=shapes: seen.append(o.shape)
            )
            with torch.no_grad():
                response_logprobs(model, ids, attn, 5, chunk_size=module.options.batching.logprob_chunk_size)
            hook.remove()
            assert shapes == [torch.Size([int(attn[:, -5:].sum()), model.config.vocab_size])], "one chunk"
    assert not caplog.records
