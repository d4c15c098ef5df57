"""RolloutDataModule: batch layout, sharding over ranks, resumable prompt order, dynamic sampling, errors."""

import pytest
import torch
from support import grouped

from gspo_lightning.data import AdditionTask, PromptRecord, PromptSource
from gspo_lightning.engines import SamplingConfig
from gspo_lightning.rewards import FunctionReward
from gspo_lightning.rollout import PolicyLink, RolloutDataModule


def _dm(tiny_path, **kwargs):
    defaults = dict(
        prompts=AdditionTask(num_train=40, num_val=8),
        tokenizer=tiny_path,
        prompts_per_step=4,
        num_samples=3,
        val_num_samples=2,
        sampling=SamplingConfig(max_new_tokens=8),
    )
    dm = RolloutDataModule(**grouped("data", **{**defaults, **kwargs}))
    return dm


def _ready(dm, model, rank=0, world=1, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(RolloutDataModule, "rank_and_world", property(lambda self: (rank, world)))
    dm.setup("fit")
    dm.connect(PolicyLink(model))
    return dm


def test_batch_layout(tiny_path, tiny_model):
    dm = _ready(_dm(tiny_path), tiny_model)
    batch = dm.next_rollout()
    n = 4 * 3
    assert len(batch) == n and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert batch.input_ids.shape[1] == batch.prompt_width + batch.response_mask.shape[1]
    # responses start right after the (left-padded) prompt, the attention mask covers both
    assert torch.equal(batch.attention_mask[:, batch.prompt_width :], batch.response_mask)
    assert len(batch.completions) == len(batch.prompts) == len(batch.answers) == n
    assert batch.prompts[0] == batch.prompts[2] and batch.answers[0] == str(eval(batch.prompts[0][:-1]))
    for key in (
        "rollout/reward_mean",
        "rollout/zero_std_group_frac",
        "time/generate_s",
        "rollout/truncated_frac",
    ):
        assert key in batch.metrics


def test_ranks_get_disjoint_prompts(tiny_path, tiny_model, monkeypatch):
    seen = []
    for rank in (0, 1):
        dm = _ready(_dm(tiny_path), tiny_model, rank=rank, world=2, monkeypatch=monkeypatch)
        seen.append({p.record.index for p in dm.next_prompts(20)})
        assert len(dm.next_rollout()) == 2 * 3  # B / world prompts per rank
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 20


def test_state_dict_resumes_with_the_next_prompts(tiny_path, tiny_model):
    a = _ready(_dm(tiny_path), tiny_model)
    a.next_prompts(30)
    state = a.state_dict()
    expected = [p.record.index for p in a.next_prompts(25)]  # crosses into the second (reshuffled) pass
    b = _ready(_dm(tiny_path), tiny_model)
    b.load_state_dict(state)
    assert [p.record.index for p in b.next_prompts(25)] == expected
    assert b.epoch == 1


def test_resume_with_another_seed_is_refused(tiny_path):
    dm = _dm(tiny_path, seed=1)
    with pytest.raises(ValueError, match="same data.rollout.seed"):
        dm.load_state_dict({"epoch": 0, "cursor": 3, "steps": 1, "seed": 0})


def test_resume_with_another_prompt_set_is_refused(tiny_path, tiny_model):
    state = _ready(_dm(tiny_path), tiny_model).state_dict()
    other = _dm(tiny_path, prompts=AdditionTask(num_train=40, num_val=8, seed=1))  # same count, other prompts
    other.load_state_dict(state)  # restored before setup: checked once the prompts are encoded
    with pytest.raises(ValueError, match="another prompt set") as error:
        other.setup("fit")
    assert "\n" not in str(error.value) and "data.prompts" in str(error.value)
    fewer = _ready(_dm(tiny_path, prompts=AdditionTask(num_train=39, num_val=8)), tiny_model)
    with pytest.raises(ValueError, match="40 training prompts"):
        fewer.load_state_dict(state)
    _ready(_dm(tiny_path), tiny_model).load_state_dict(state)  # the same prompts resume
    old_checkpoint = {k: v for k, v in state.items() if k != "prompts"}
    _ready(_dm(tiny_path, prompts=AdditionTask(num_train=40, num_val=8, seed=1)), tiny_model).load_state_dict(
        old_checkpoint
    )  # written before fingerprints: nothing to compare


def test_restored_rollouts_do_not_depend_on_what_ran_before(tiny_path, tiny_model):
    a = _ready(_dm(tiny_path), tiny_model)
    a.next_rollout()
    state = a.state_dict()
    expected = a.next_rollout().input_ids
    b = _ready(_dm(tiny_path), tiny_model)
    b.load_state_dict(state)
    torch.rand(1000)  # anything drawn between the checkpoint and the next rollout (evaluation, loaders)
    list(b.evaluate_heldout())
    assert torch.equal(b.next_rollout().input_ids, expected)


def test_rollouts_leave_the_process_random_stream_alone(tiny_path, tiny_model):
    dm = _ready(_dm(tiny_path), tiny_model)
    torch.manual_seed(5)
    dm.next_rollout()
    after_rollout = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after_rollout)


def test_dynamic_sampling_replaces_zero_variance_groups(tiny_path, tiny_model):
    # reward 1 for prompts whose first operand is even, per sample alternating otherwise
    def reward(prompts, completions, answers):
        return [float(int(p.split("+")[0]) % 2 == 0 or i % 2) for i, p in enumerate(prompts)]

    dm = _ready(
        _dm(tiny_path, rewards=[FunctionReward(reward)], dynamic_sampling=True, max_sampling_rounds=10),
        tiny_model,
    )
    batch = dm.next_rollout()
    assert len(batch) == 12
    groups = batch.rewards.view(4, 3)
    assert (groups.std(1) > 0).all(), "every kept group has reward variance"
    assert batch.metrics["rollout/zero_std_group_frac"] > 0


def test_dynamic_sampling_fills_with_dropped_groups_when_rounds_run_out(tiny_path, tiny_model):
    dm = _ready(
        _dm(tiny_path, rewards=[FunctionReward(lambda p, c, a: [1.0] * len(p))], dynamic_sampling=True),
        tiny_model,
    )
    batch = dm.next_rollout()
    assert len(batch) == 12 and batch.metrics["rollout/sampling_rounds"] == 3
    assert batch.metrics["rollout/zero_std_group_frac"] == 1.0


def test_evaluate_scores_greedy_and_sampled(tiny_path, tiny_model):
    dm = _ready(_dm(tiny_path), tiny_model)
    result = dm.evaluate(dm.val_prompts)
    assert result.greedy_correct.shape == (8,) and result.sampled_correct.shape == (8, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 1}, "at least two samples"),
        ({"reward_weights": [1.0, 2.0]}, "data.reward_weights"),
        ({"prompts_per_step": 0}, "must be >= 1"),
        ({"val_size": -1}, "data.heldout.size=-1"),
        ({"val_num_samples": -1}, "data.heldout.num_samples=-1"),
    ],
)
def test_bad_options(tiny_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _dm(tiny_path, **kwargs)


def test_prompts_per_step_must_split_over_ranks(tiny_path, tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="divisible by the 3"):
        _ready(_dm(tiny_path), tiny_model, rank=0, world=3, monkeypatch=monkeypatch)


def test_overlong_prompts_error_names_the_option(tiny_path):
    dm = _dm(tiny_path, max_prompt_length=3, on_overlong="error")
    with pytest.raises(ValueError, match="max_prompt_length"):
        dm.setup("fit")


class _Records(PromptSource):
    """Fixed train and held-out prompts."""

    def __init__(self, train: list[str], val: list[str]) -> None:
        self._splits = [[PromptRecord(text, None, i) for i, text in enumerate(split)] for split in (train, val)]

    def train(self) -> list[PromptRecord]:
        return self._splits[0]

    def validation(self) -> list[PromptRecord]:
        return self._splits[1]


def test_overlong_heldout_prompts_are_counted(tiny_path):
    prompts = _Records(["1+2="] * 8, ["3+4=", "12+34+56+78=", "5+6="])
    dm = _dm(tiny_path, prompts=prompts, max_prompt_length=8)
    with pytest.warns(UserWarning, match=r"Dropped 1 held-out prompts? longer than data.encoding.max_prompt_length=8"):
        dm.setup("fit")
    assert len(dm.val_prompts) == 2


def test_fewer_training_prompts_than_a_batch_warns(tiny_path):
    dm = _dm(tiny_path, prompts=AdditionTask(num_train=3, num_val=2), prompts_per_step=4)
    with pytest.warns(UserWarning, match="3 training prompts for data.rollout.prompts_per_step=4"):
        dm.setup("fit")
