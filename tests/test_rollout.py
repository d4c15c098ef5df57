"""The rollout collector's dynamic sampling: which groups count as informative."""

import torch

from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.data.prompts import PromptRecord
from gspo_lightning.engines.base import Generation, RolloutEngine
from gspo_lightning.rewards import FunctionReward
from gspo_lightning.rollout import RolloutCollector


class OneTokenEngine(RolloutEngine):
    """Answers every prompt with one token."""

    def bind(self, policy) -> None:
        pass

    @property
    def is_bound(self) -> bool:
        return True

    def generate(self, prompt_ids, num_samples, greedy=False) -> Generation:
        n = len(prompt_ids) * num_samples
        return Generation(
            prompt_ids=torch.ones(n, 1, dtype=torch.long),
            prompt_mask=torch.ones(n, 1, dtype=torch.bool),
            response_ids=torch.full((n, 1), 3),
            response_mask=torch.ones(n, 1, dtype=torch.bool),
            truncated=torch.zeros(n, dtype=torch.bool),
        )


def test_weighted_equal_rewards_are_not_informative(tiny_tokenizer):
    # weights [1.0, 0.1] make every reward 0.1 (0 + 0.1 x 1): the float32 group mean was 1 ulp off and the
    # group counted as informative
    g = 8
    collector = RolloutCollector(
        engine=OneTokenEngine(),
        tokenizer=tiny_tokenizer,
        rewards=[FunctionReward(lambda p, c, a: [0.0] * len(p)), FunctionReward(lambda p, c, a: [1.0] * len(p))],
        reward_weights=[1.0, 0.1],
        num_samples=g,
        max_new_tokens=1,
        dynamic_sampling=True,
        max_sampling_rounds=2,
    )
    prompts = [EncodedPrompt(record=PromptRecord(text="1+1=", answer="2", index=i), input_ids=[1, 2]) for i in range(2)]
    batch = collector.collect(lambda k: prompts[:k], 2)
    assert batch.metrics["rollout/zero_std_group_frac"] == 1.0 and batch.metrics["rollout/sampling_rounds"] == 2
