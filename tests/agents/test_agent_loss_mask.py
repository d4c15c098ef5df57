"""Multi-turn batches in training: tool tokens are forwarded as context but never scored, counted or trained on."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from gspo_lightning import (
    LossCounts,
    PolicyObjective,
    PPOClip,
    RolloutBatch,
    SequenceRatio,
    SequenceTokenRatio,
    TokenRatio,
)
from gspo_lightning.components.masks import OffPolicySequenceMask
from gspo_lightning.training.logprobs import DEFAULT_CHUNK_SIZE, response_logprobs
from gspo_lightning.training.options import BatchingOptions, LossOptions
from gspo_lightning.training.update import PolicyLoss

VOCAB, PAD = 40, 0
P, T = 3, 11
# per row: the response as (kind, length) segments, "m" model tokens, "t" appended tool tokens
LAYOUT = [
    [("m", 3), ("t", 4), ("m", 2)],  # 9 of 11 columns real
    [("m", 2), ("t", 3), ("m", 4), ("t", 2)],  # ends with tool tokens (a rollout function may return that)
    [("m", 5)],  # single turn
]
PROMPT_LENGTHS = [3, 2, 3]


def _masks():
    response = torch.zeros(len(LAYOUT), T, dtype=torch.bool)
    real = torch.zeros(len(LAYOUT), T, dtype=torch.bool)
    for i, segments in enumerate(LAYOUT):
        col = 0
        for kind, n in segments:
            response[i, col : col + n] = kind == "m"
            real[i, col : col + n] = True
            col += n
    prompt = torch.arange(P)[None, :] >= (P - torch.tensor(PROMPT_LENGTHS))[:, None]
    return prompt, real, response


PROMPT_MASK, REAL, MODEL = _masks()
TOOL = REAL & ~MODEL
TRAILING = TOOL.clone()
TRAILING[0] = False  # row 1's last two tool tokens come after its last model token
TRAILING[1, :9] = False
TRAILING[2] = False


def batch_ids(seed: int = 0, tool_seed: int | None = None) -> torch.Tensor:
    """(N, P+T) ids: pad where not real; the tool tokens drawn from ``tool_seed`` when given."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(LAYOUT), P + T), generator=g)
    if tool_seed is not None:
        other = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(tool_seed))
        tool = torch.cat([torch.zeros(len(LAYOUT), P, dtype=torch.bool), TOOL], 1)
        ids = torch.where(tool, other, ids)
    attention = torch.cat([PROMPT_MASK, REAL], 1)
    return ids.masked_fill(~attention, PAD)


@pytest.fixture(scope="module")
def model():
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=PAD, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).eval()


def reference_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """(N, T) log-probs of every real response token, each row forwarded alone without padding."""
    attention = torch.cat([PROMPT_MASK, REAL], 1)
    out = torch.zeros(len(LAYOUT), T)
    with torch.no_grad():
        for i in range(len(LAYOUT)):
            real = ids[i][attention[i]]
            logp = torch.log_softmax(model(input_ids=real[None]).logits[0].float(), -1)
            p = int(PROMPT_MASK[i].sum())
            n = int(REAL[i].sum())
            out[i, :n] = logp[p - 1 : p - 1 + n].gather(-1, real[p : p + n, None]).squeeze(-1)
    return out


@pytest.mark.parametrize("chunk_size", [None, DEFAULT_CHUNK_SIZE], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_logprobs_and_entropy_are_zero_at_tool_positions(model, chunk_size, padding_free):
    ids = batch_ids()
    attention = torch.cat([PROMPT_MASK, REAL], 1)
    kw = {"with_entropy": True, "chunk_size": chunk_size, "padding_free": padding_free}
    with torch.no_grad():
        masked = response_logprobs(model, ids, attention, T, loss_mask=MODEL, **kw)
        unmasked = response_logprobs(model, ids, attention, T, **kw)
    ref = reference_logprobs(model, ids)
    assert (masked.logprobs[~MODEL] == 0).all() and (masked.entropy[~MODEL] == 0).all()
    assert (masked.logprobs[MODEL] < 0).all() and (masked.entropy[MODEL] > 0).all()
    torch.testing.assert_close(masked.logprobs[MODEL], ref[MODEL], atol=1e-5, rtol=1e-5)
    # without the loss mask the tool tokens are scored (so the mask is what zeroes them)
    assert (unmasked.logprobs[TOOL] < 0).all()
    torch.testing.assert_close(unmasked.logprobs[REAL], ref[REAL], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.entropy[MODEL], unmasked.entropy[MODEL])


def test_tool_tokens_are_context_not_loss(model):
    """Other tool ids change the later model tokens' log-probs (attention), never a tool position's loss term."""
    attention = torch.cat([PROMPT_MASK, REAL], 1)
    objective = PolicyObjective(SequenceRatio(), PPOClip(0.2, 0.2), aggregation="seq-mean-token-mean")
    adv = torch.tensor([1.0, -0.5, 0.7])
    results = []
    for tool_seed in (None, 7):
        ids = batch_ids(tool_seed=tool_seed)
        lp = response_logprobs(model, ids, attention, T, loss_mask=MODEL).logprobs
        lp.retain_grad()
        old = lp.detach() - 0.05 * MODEL
        objective(lp, old, adv, MODEL, counts=LossCounts.from_mask(MODEL)).loss.backward()
        assert (lp.grad[~MODEL] == 0).all() and (lp.grad[MODEL] != 0).all()
        results.append(lp.detach())
    a, b = results
    first_tool = torch.tensor([3, 2, T])  # columns before each row's first tool token do not see it
    before = torch.arange(T)[None, :] < first_tool[:, None]
    torch.testing.assert_close(a[before & MODEL], b[before & MODEL])
    assert not torch.allclose(a[~before & MODEL], b[~before & MODEL])


def test_sequence_ratio_normalises_by_model_tokens_only():
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(len(LAYOUT), T, generator=g)
    old = -torch.rand(len(LAYOUT), T, generator=g)
    # garbage on tool and padding positions must not reach the ratio
    lp_bad, old_bad = lp.masked_fill(~MODEL, 50.0), old.masked_fill(~MODEL, -50.0)
    out = SequenceRatio()(lp_bad, old_bad, MODEL)
    for i in range(len(LAYOUT)):
        cols = [c for c in range(T) if MODEL[i, c]]
        expected = sum(float(lp[i, c] - old[i, c]) for c in cols) / len(cols)
        assert out[i, MODEL[i]].tolist() == pytest.approx([expected] * len(cols), abs=1e-6)
        assert (out[i, ~MODEL[i]] == 0).all()
    counts = LossCounts.from_mask(MODEL)
    assert counts.num_tokens == 5 + 6 + 5 and counts.num_seqs == 3  # tool tokens are not counted


def _batch(ids, old, rollout, adv) -> RolloutBatch:
    return RolloutBatch(
        input_ids=ids,
        attention_mask=torch.cat([PROMPT_MASK, REAL], 1),
        response_mask=MODEL,
        rewards=torch.zeros(len(LAYOUT)),
        group_ids=torch.zeros(len(LAYOUT), dtype=torch.long),
        old_logprobs=old,
        rollout_logprobs=rollout,
        advantages=adv,
    )


def _grad(model, loss_fn, batch) -> torch.Tensor:
    model.zero_grad()
    loss, _ = loss_fn(model, batch, LossCounts.from_mask(batch.response_mask))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


OBJECTIVES = {
    "gspo": lambda: PolicyObjective(SequenceRatio(), PPOClip(0.2, 0.2), aggregation="seq-mean-token-mean"),
    "gspo-token": lambda: PolicyObjective(SequenceTokenRatio(), PPOClip(0.2, 0.2), aggregation="seq-mean-token-mean"),
    "grpo": lambda: PolicyObjective(TokenRatio(), PPOClip(0.2, 0.28), aggregation="token-mean"),
    "grpo-opsm": lambda: PolicyObjective(TokenRatio(), PPOClip(0.2, 0.2), masks=[OffPolicySequenceMask(delta=0.05)]),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gradient_ignores_garbage_at_tool_positions(model, name):
    """old / rollout log-probs and per-token advantages at tool positions are masked out of the loss."""
    model.train(False)
    ids = batch_ids()
    attention = torch.cat([PROMPT_MASK, REAL], 1)
    with torch.no_grad():
        lp = response_logprobs(model, ids, attention, T, loss_mask=MODEL).logprobs
    g = torch.Generator().manual_seed(5)
    old = (lp + 0.3 * torch.randn(lp.shape, generator=g)).masked_fill(~MODEL, 0.0)
    rollout = (lp + 0.02 * torch.randn(lp.shape, generator=g)).masked_fill(~MODEL, 0.0)
    adv_seq = torch.tensor([1.0, -1.0, 0.5])
    adv = (adv_seq[:, None] + 0.1 * torch.randn(lp.shape, generator=g)) if name != "gspo" else adv_seq
    adv = adv.masked_fill(~MODEL, 0.0) if adv.dim() == 2 else adv
    loss_fn = PolicyLoss(OBJECTIVES[name](), LossOptions(), BatchingOptions())
    clean = _grad(model, loss_fn, _batch(ids, old, rollout, adv))
    assert clean.abs().sum() > 0

    garbage_old = old.masked_fill(TOOL, 30.0)
    garbage_rollout = rollout.masked_fill(TOOL, 40.0)
    garbage_adv = adv.masked_fill(TOOL, -1e3) if adv.dim() == 2 else adv
    dirty = _grad(model, loss_fn, _batch(ids, garbage_old, garbage_rollout, garbage_adv))
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)

    # the same garbage on model positions does change the gradient (the check can fail)
    moved = _grad(model, loss_fn, _batch(ids, old.masked_fill(MODEL, -3.0), rollout, adv))
    assert not torch.allclose(moved, clean)


def test_gradient_ignores_tool_tokens_after_the_last_model_token(model):
    loss_fn = PolicyLoss(OBJECTIVES["gspo"](), LossOptions(), BatchingOptions())
    ids = batch_ids()
    other = ids.clone()
    response = other[:, P:]  # a view: writing it changes ``other``
    response[TRAILING] = response[TRAILING] % (VOCAB - 1) + 1  # every trailing tool id replaced by another
    assert (other != ids).sum() == int(TRAILING.sum()) == 2
    with torch.no_grad():
        lp = response_logprobs(model, ids, torch.cat([PROMPT_MASK, REAL], 1), T, loss_mask=MODEL).logprobs
    old = (lp - 0.1).masked_fill(~MODEL, 0.0)
    adv = torch.tensor([1.0, -1.0, 0.5])
    a = _grad(model, loss_fn, _batch(ids, old, None, adv))
    b = _grad(model, loss_fn, _batch(other, old, None, adv))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_response_spans_end_at_the_last_model_token():
    batch = _batch(batch_ids(), None, None, None)
    assert batch.response_spans.tolist() == [9, 9, 5]
    assert batch.response_lengths.tolist() == [5, 6, 5]
