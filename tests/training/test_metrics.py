"""Logged policy metrics do not depend on how a rollout batch is split over micro-batches and ranks."""

import pytest
import torch
from support import built_module, prepared

from gspo_lightning import LossCounts
from gspo_lightning.training.metrics import MetricAccumulator, response_counts
from gspo_lightning.training.splits import micro_batch_indices


def _rank_metrics(module, batch, counts, micro_batch_size):
    acc = MetricAccumulator()
    for index in micro_batch_indices(len(batch), micro_batch_size):
        micro = batch.select(index)
        with torch.no_grad():
            _, metrics = module.policy_loss(module.policy, micro, counts)
        acc.add_micro_batch(metrics, *response_counts(micro.response_mask))
    acc.end_step({"policy/grad_norm": torch.tensor(2.0)})
    return acc


def _logged(module, batch, micro_batch_size, ranks):
    """What would be logged with the batch split over ``ranks`` data-parallel ranks (simulated in-process)."""
    counts = LossCounts.from_mask(batch.response_mask)  # global: the strategy adapter sums them over ranks
    shards = [batch.select(i) for i in torch.tensor_split(torch.arange(len(batch)), ranks)]
    accumulators = [_rank_metrics(module, shard, counts, micro_batch_size) for shard in shards]
    sent: list[list[torch.Tensor]] = [[] for _ in accumulators]
    for rank, acc in enumerate(accumulators[1:], start=1):  # record what the other ranks contribute, in order

        def record(tensor, op, rank=rank):
            sent[rank].append(tensor)
            return tensor

        acc.result(record)
    ops = {"sum": lambda ts: torch.stack(ts).sum(0), "max": lambda ts: torch.stack(ts).amax(0)}
    ops["min"] = lambda ts: torch.stack(ts).amin(0)
    calls = iter(range(100))

    def all_reduce(tensor, op):
        k = next(calls)
        return ops[op]([tensor, *(sent[r][k] for r in range(1, ranks))])

    return accumulators[0].result(all_reduce)


@pytest.mark.parametrize(("micro_batch_size", "ranks"), [(3, 1), (1, 1), (None, 2), (3, 2)])
def test_logged_metrics_match_the_whole_batch(tiny_path, rollout, micro_batch_size, ranks):
    module = built_module(tiny_path, mini_batches=2, entropy_coef=0.01)
    batch = prepared(module, rollout)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    with torch.no_grad():
        loss, _ = module.policy_loss(module.policy, batch, LossCounts.from_mask(batch.response_mask))
    whole = _logged(module, batch, None, 1)
    assert whole["policy/loss"] == pytest.approx(float(loss), rel=1e-6)
    split = _logged(module, batch, micro_batch_size, ranks)
    assert split.keys() == whole.keys()
    for name, value in whole.items():
        assert split[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
