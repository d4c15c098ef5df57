"""Token exactness of multi-turn rollouts on a real engine: record every ``generate`` call, then check that each
turn's input is the previous input + the engine's sampled ids + the appended message's ids, and that the batch the
trainer gets holds exactly those ids (the sampled ones under the loss mask)."""

from __future__ import annotations

import torch
from agent_envs import ThreeTurns

from gspo_lightning.data import MultiplicationTask
from gspo_lightning.data.chat import MessageRenderer
from gspo_lightning.engines import SamplingConfig
from gspo_lightning.rollout import PolicyLink, RolloutDataModule, RolloutOptions

CALCULATOR = "builtin:tiny-qwen3-moe-calculator-random"


def likely_eos(model):
    """``model`` with its EOS logit raised by 4, so that the random model ends most turns within a few tokens."""
    eos = model.config.eos_token_id

    def hook(module, inputs, logits):
        return logits + 4.0 * torch.nn.functional.one_hot(torch.tensor(eos), logits.shape[-1]).to(logits)

    model.get_output_embeddings().register_forward_hook(hook)
    return model


def recorded_rollout(path: str, model, engine):
    """A rollout batch of ``ThreeTurns`` trajectories from ``engine``, and every ``generate`` call it made."""
    calls = []
    generate = engine.generate

    def recording(prompt_ids, num_samples, greedy=False, **kwargs):
        out = generate(prompt_ids, num_samples, greedy=greedy, **kwargs)
        sampled = [out.response_ids[r][out.response_mask[r]].tolist() for r in range(out.response_ids.shape[0])]
        calls.append(([list(p) for p in prompt_ids], num_samples, sampled))
        return out

    engine.generate = recording
    dm = RolloutDataModule(
        prompts=MultiplicationTask(num_train=16, num_val=2),
        tokenizer=path,
        rollout=RolloutOptions(prompts_per_step=2, num_samples=2),
        sampling=SamplingConfig(max_new_tokens=6),
        engine=engine,
        environment=ThreeTurns,
    )
    dm.setup("fit")
    dm.connect(PolicyLink(model))
    torch.manual_seed(0)
    return dm, dm.next_rollout(), calls


def check_concatenation(dm, batch, calls) -> int:
    """Replay the calls turn by turn against the batch; returns how many later-turn contexts were checked."""
    tok = dm.tokenizer
    renderer = MessageRenderer(tok)
    prompts, g, first = calls[0]
    seqs = [list(prompts[i // g]) + first[i] for i in range(len(first))]
    sampled = [[(len(prompts[i // g]), len(seqs[i]))] for i in range(len(seqs))]  # [start, end) of model turns
    active = [i for i in range(len(seqs)) if seqs[i][-1] == tok.eos_token_id]
    checked = 0
    for turn, (contexts, samples, out) in enumerate(calls[1:]):
        suffix = renderer.ids(ThreeTurns().step(_turn(turn)).messages)
        assert samples == 1
        assert contexts == [seqs[i] + suffix for i in active], "each turn's input is the previous ids + the suffix"
        for i, ids in zip(active, out, strict=True):
            start = len(seqs[i]) + len(suffix)
            seqs[i] = seqs[i] + suffix + ids
            sampled[i].append((start, len(seqs[i])))
        checked += len(active)
        active = [i for i in active if seqs[i][-1] == tok.eos_token_id and turn + 1 < 2]
    p = batch.prompt_width
    for i, seq in enumerate(seqs):
        assert batch.input_ids[i][batch.attention_mask[i]].tolist() == seq, "the trainer gets the engine's ids"
        mask = torch.zeros(batch.input_ids.shape[1], dtype=torch.bool)
        offset = p - int(batch.attention_mask[i, :p].sum())  # left padding of the prompt
        for start, end in sampled[i]:
            mask[offset + start : offset + end] = True
        assert torch.equal(batch.response_mask[i], mask[p:]), "the loss mask covers the sampled ids only"
    return checked


def _turn(index: int):
    from gspo_lightning.agents import ParsedTurn, Turn

    return Turn(text="", parsed=ParsedTurn(), index=index)
