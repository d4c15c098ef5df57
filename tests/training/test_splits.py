"""Splitting a rollout batch: token-budget micro-batches, trimmed widths, rank agreement."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_batch

from gspo_lightning import RolloutBatch
from gspo_lightning.training.splits import micro_batches, token_budget_indices


def uneven_batch(prompt_lengths: list[int], response_lengths: list[int]) -> RolloutBatch:
    """Left-padded prompts and right-padded responses of the given real lengths (one token each at least)."""
    p, t = max(max(prompt_lengths), 1), max(max(response_lengths), 1)
    columns = torch.arange(p + t)
    prompt = torch.tensor(prompt_lengths)[:, None]
    response = torch.tensor(response_lengths)[:, None]
    attention = ((columns < p) & (columns >= p - prompt)) | ((columns >= p) & (columns < p + response))
    return RolloutBatch(
        input_ids=torch.ones(len(prompt_lengths), p + t, dtype=torch.long),
        attention_mask=attention,
        response_mask=attention[:, p:],
        rewards=torch.zeros(len(prompt_lengths)),
        group_ids=torch.arange(len(prompt_lengths)),
    )


@given(
    lengths=st.lists(st.tuples(st.integers(0, 25), st.integers(1, 25)), min_size=1, max_size=40),
    budget=st.integers(min_value=1, max_value=120),
)
@settings(max_examples=200, deadline=None)
def test_token_budget_packs_every_sequence_once_within_budget(lengths, budget):
    prompt_t, response_t = torch.tensor(lengths).T
    parts = token_budget_indices(prompt_t, response_t, budget)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))
    total = prompt_t + response_t
    for part in parts:
        # the micro-batch padded to its prompt width + its response width
        padded = len(part) * (int(prompt_t[part].max()) + int(response_t[part].max()))
        assert padded <= budget or len(part) == 1  # only a sequence longer than the budget stands alone
        assert int(total[part].sum()) <= padded
    order = torch.cat(parts)
    assert torch.equal(total[order], total[order].sort(descending=True).values)  # similar lengths together


@given(
    lengths=st.lists(st.tuples(st.integers(0, 25), st.integers(0, 25)), min_size=1, max_size=30),
    budget=st.integers(min_value=1, max_value=150),
)
@settings(max_examples=100, deadline=None)
def test_every_trimmed_micro_batch_is_within_its_padded_budget(lengths, budget):
    prompts, responses = zip(*lengths, strict=True)
    batch = uneven_batch(list(prompts), list(responses))
    parts = micro_batches(batch, tokens=budget)
    assert sorted(torch.cat([i for i, _ in parts]).tolist()) == list(range(len(lengths)))
    for _, part in parts:
        # what the forward computes on: rows x (prompt width + response width) once trimmed
        assert part.input_ids.numel() <= budget or len(part) == 1


def test_sequences_of_equal_length_but_different_shapes_are_not_padded_past_the_budget():
    # four 110-token sequences, two prompt-heavy and two response-heavy: padded together they would be
    # 4 x (100 + 100) = 800 tokens for a budget of 440
    batch = uneven_batch([100, 100, 10, 10], [10, 10, 100, 100])
    parts = micro_batches(batch, tokens=440)
    assert [part.input_ids.numel() for _, part in parts] == [2 * 110, 2 * 110]
    assert sorted(i.tolist() for i, _ in parts) == [[0, 1], [2, 3]]


def test_micro_batches_are_trimmed_to_their_own_widths():
    # responses of 1, 1, 4, 4 tokens under a width of 4; prompts of 2 real tokens under a width of 3
    mask = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    batch = make_batch([0.0, 1.0, 0.0, 1.0], group_size=2, response_mask=mask, prompt_width=3)
    batch.attention_mask[:, 0] = False  # one column of left padding in every prompt
    batch.old_logprobs = torch.arange(16.0).view(4, 4)
    parts = micro_batches(batch, tokens=12)
    assert [i.tolist() for i, _ in parts] == [[2, 3], [0, 1]]
    (_, long), (_, short) = parts
    assert long.input_ids.shape == (2, 2 + 4) and short.input_ids.shape == (2, 2 + 1)
    assert short.response_mask.shape == (2, 1) and torch.equal(short.old_logprobs, torch.tensor([[0.0], [4.0]]))
    assert short.prompt_width == 2 and short.attention_mask.all()


def test_ranks_agree_on_the_number_of_micro_batches():
    batch = make_batch([0.0] * 6, group_size=2)
    parts = micro_batches(batch, tokens=1000, agree=lambda count: count + 2)  # another rank needs 3
    assert len(parts) == 3 and sorted(torch.cat([i for i, _ in parts]).tolist()) == list(range(6))
