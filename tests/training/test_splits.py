"""Splitting a rollout batch: token-budget micro-batches, trimmed widths, rank agreement."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import make_batch

from gspo_lightning.training.splits import micro_batches, token_budget_indices


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40),
    budget=st.integers(min_value=1, max_value=120),
)
@settings(max_examples=200, deadline=None)
def test_token_budget_packs_every_sequence_once_within_budget(lengths, budget):
    lengths_t = torch.tensor(lengths)
    parts = token_budget_indices(lengths_t, budget)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))
    for part in parts:
        padded = len(part) * int(lengths_t[part].max())  # the micro-batch padded to its longest sequence
        assert padded <= budget or len(part) == 1  # only a sequence longer than the budget stands alone
        assert int(lengths_t[part].sum()) <= padded
    order = torch.cat(parts)
    assert torch.equal(lengths_t[order], lengths_t[order].sort(descending=True).values)  # similar lengths together


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
