"""TransformersEngine: EOS masks, group layout, padding, greedy decoding, train/eval mode."""

import pytest
import torch

from gspo_lightning.engines import SamplingConfig, TransformersEngine
from gspo_lightning.engines.base import response_mask_until_eos


def _engine(model, tokenizer, **sampling):
    engine = TransformersEngine()
    engine.configure(SamplingConfig(**{"max_new_tokens": 6, **sampling}), tokenizer)
    engine.bind(model)
    return engine


def test_response_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    mask, truncated = response_mask_until_eos(ids, torch.tensor([1]), max_new_tokens=4)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_generate_shapes_groups_and_padding(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("12+34=")["input_ids"], tiny_tokenizer("5+6=")["input_ids"]]
    torch.manual_seed(0)
    gen = _engine(tiny_model, tiny_tokenizer).generate(prompts, num_samples=3)
    assert gen.prompt_ids.shape[0] == gen.response_ids.shape[0] == 6
    # samples of one prompt are adjacent and share its (left-padded) prompt
    assert (gen.prompt_ids[0] == gen.prompt_ids[2]).all() and not gen.prompt_mask[3, 0]
    assert gen.response_mask[:, 0].all() and gen.response_ids.shape[1] <= 6
    pad = tiny_tokenizer.pad_token_id
    assert (gen.response_ids[~gen.response_mask] == pad).all()
    assert gen.truncated.dtype == torch.bool and gen.truncated.shape == (6,)


def test_generate_restores_the_policy_mode(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("5+6=")["input_ids"]]
    engine = _engine(tiny_model, tiny_tokenizer)
    for training in (True, False, True):
        tiny_model.train(training)
        engine.generate(prompts, num_samples=1)
        assert tiny_model.training is training, "the engine must restore the mode it found"


def test_greedy_is_deterministic(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("12+34=")["input_ids"]]
    engine = _engine(tiny_model, tiny_tokenizer)
    a = engine.generate(prompts, 1, greedy=True).response_ids
    b = engine.generate(prompts, 1, greedy=True).response_ids
    assert torch.equal(a, b)


def test_the_checkpoint_generation_config_does_not_shape_rollouts(tiny_model, tiny_tokenizer):
    prompts = [tiny_tokenizer("12+34=")["input_ids"], tiny_tokenizer("7+8=")["input_ids"]]
    engine = _engine(tiny_model, tiny_tokenizer)
    torch.manual_seed(0)
    clean = engine.generate(prompts, num_samples=4).response_ids
    # a checkpoint whose generation_config.json suppresses every token but "1" and penalises repeats
    keep = tiny_tokenizer.convert_tokens_to_ids("1")
    tiny_model.generation_config.suppress_tokens = [i for i in range(tiny_model.config.vocab_size) if i != keep]
    tiny_model.generation_config.repetition_penalty = 5.0
    torch.manual_seed(0)
    shaped = engine.generate(prompts, num_samples=4).response_ids
    assert torch.equal(shaped, clean)
    assert tiny_model.generation_config.repetition_penalty == 5.0, "the model's own config is left as it was"


def test_truncated_sampling_is_refused_for_training_rollouts(tiny_tokenizer):
    for sampling in (SamplingConfig(top_p=0.9), SamplingConfig(top_k=20)):
        with pytest.raises(ValueError, match="top_p: 1.0 and top_k: 0"):
            TransformersEngine().configure(sampling, tiny_tokenizer)


def test_sampled_rollouts_report_the_trainers_log_probs(tiny_model, tiny_tokenizer):
    from gspo_lightning.training.logprobs import response_logprobs

    prompts = [tiny_tokenizer("12+34=")["input_ids"], tiny_tokenizer("7+8=")["input_ids"]]
    engine = TransformersEngine(batch_size=1)  # two generate calls: chunks of different widths
    engine.configure(SamplingConfig(temperature=0.7, max_new_tokens=6), tiny_tokenizer)
    engine.bind(tiny_model)
    torch.manual_seed(0)
    gen = engine.generate(prompts, num_samples=3)
    assert gen.logprobs is not None and gen.logprobs.shape == gen.response_mask.shape
    ids = torch.cat([gen.prompt_ids, gen.response_ids], 1)
    attn = torch.cat([gen.prompt_mask, gen.response_mask], 1)
    tiny_model.eval()
    with torch.no_grad():
        trainer = response_logprobs(tiny_model, ids, attn, gen.response_ids.shape[1], temperature=0.7).logprobs
    mask = gen.response_mask
    torch.testing.assert_close(gen.logprobs[mask], trainer[mask], rtol=1e-4, atol=1e-4)
    assert (gen.logprobs[~mask] == 0).all()
    assert engine.generate(prompts, num_samples=1, greedy=True).logprobs is None
