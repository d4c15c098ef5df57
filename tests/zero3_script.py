"""Run under ``torch.distributed.run``: DeepSpeed ZeRO-3 on CPU (gloo), full weights gathered two ways.

Writes ``{check: bool}`` as JSON to argv[1] from rank 0. Checked: parameters really are partitioned; the
vLLM sync's ``iter_full_weights`` and the export's ``full_state_dict`` both give back the full weights
(every state-dict key, tied ``lm_head`` included) before and after an optimizer step; after the step they
changed and every rank gathered the same tensors.
"""

import json
import sys

import deepspeed
import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from gspo_lightning.engines.vllm_weights import iter_full_weights
from gspo_lightning.sharding import full_state_dict, is_zero3
from gspo_lightning.training.logprobs import response_logprobs


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    config = Qwen3MoeConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    checks = {
        "partitioned": is_zero3(model) and model.model.embed_tokens.weight.numel() == 0,
        "iter_before": same(dict(iter_full_weights(model)), before),
        "full_before": same(full_state_dict(model), before),
    }
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    after = dict(iter_full_weights(model))
    checks["full_after_matches_iter"] = same(full_state_dict(model), after)
    checks["changed"] = not torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    checks["tied_alias"] = torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    # the chunked log-prob head calls the (partitioned, tied) output projection as a module: ZeRO-3 gathers it,
    # in the forward and in the backward recomputation
    mask = torch.ones(2, 8, dtype=torch.bool)
    with torch.no_grad():
        full = response_logprobs(model, ids, mask, 4, with_entropy=True, chunk_size=None)
        chunked = response_logprobs(model, ids, mask, 4, with_entropy=True, chunk_size=3)
    checks["chunked_head"] = torch.allclose(full.logprobs, chunked.logprobs, atol=1e-5) and torch.allclose(
        full.entropy, chunked.entropy, atol=1e-5
    )
    trained = response_logprobs(model, ids, mask, 4, chunk_size=3)
    engine.backward(-trained.logprobs.sum())
    engine.step()
    checks["chunked_backward"] = all(torch.isfinite(t).all() for t in dict(iter_full_weights(model)).values())
    after = dict(iter_full_weights(model))
    checksum = torch.stack([t.double().sum() for t in after.values()])
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    checks["ranks_agree"] = all(torch.equal(g, checksum) for g in gathered)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(checks, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
