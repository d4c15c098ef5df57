"""The trainer's log-probs agree with the engine's greedy choices, with left padding and with temperature."""

import torch

from gspo_lightning.engines import SamplingConfig, TransformersEngine
from gspo_lightning.training.logprobs import response_logprobs


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
