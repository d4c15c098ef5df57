"""One rollout step on the data side: prompts -> engine -> rewards -> :class:`RolloutBatch`.

Also DAPO's dynamic sampling (arXiv 2503.14476, §3.2): groups whose G rewards are all equal carry no
learning signal (their group-relative advantage is 0); they are replaced by freshly sampled groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gspo_lightning.agents.metrics import agent_metrics
from gspo_lightning.agents.sampler import Sampler
from gspo_lightning.agents.trajectory import last_model_run
from gspo_lightning.batch import RolloutBatch
from gspo_lightning.data.encode import EncodedPrompt
from gspo_lightning.engines.base import Generation, RolloutEngine
from gspo_lightning.ops import group_stats
from gspo_lightning.rewards.base import Reward, RewardInputs
from gspo_lightning.rewards.combine import compute_rewards


def decode_responses(tokenizer, generation: Generation) -> list[str]:
    """Decoded completions, special tokens stripped (one batched call); for multi-turn trajectories, the text of
    each one's last model turn (what ``data.rewards`` score)."""
    if generation.trajectories is not None:
        return [
            t.final_text if t.final_text is not None else tokenizer.decode(last_model_run(t), skip_special_tokens=True)
            for t in generation.trajectories
        ]
    ids = generation.response_ids.masked_fill(~generation.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)


def transcripts(tokenizer, generation: Generation) -> list[str] | None:
    """Each multi-turn trajectory after its prompt, decoded with its special tokens (turns, tool calls, tool
    results readable), or None for single-turn rollouts."""
    if generation.trajectories is None:
        return None
    texts = tokenizer.batch_decode([t.completion_ids for t in generation.trajectories], skip_special_tokens=False)
    pad = tokenizer.pad_token
    return [text.replace(pad, "") if pad else text for text in texts]


def reward_inputs(
    prompts: Sequence[EncodedPrompt],
    generation: Generation,
    completions: list[str],
    num_samples: int,
    max_new_tokens: int,
    texts: list[str] | None = None,
) -> RewardInputs:
    """What the rewards see of N = len(prompts) * G completions (samples of a prompt adjacent); multi-turn
    trajectories add their transcripts ``texts`` and their environment returns."""
    columns = dict.fromkeys(k for p in prompts for k in p.record.extras)
    trajectories = generation.trajectories
    return RewardInputs(
        extras={k: [p.record.extras.get(k) for p in prompts for _ in range(num_samples)] for k in columns},
        prompts=[p.record.text for p in prompts for _ in range(num_samples)],
        completions=completions,
        answers=[p.record.answer for p in prompts for _ in range(num_samples)],
        response_lengths=generation.sampled_mask.sum(-1),
        truncated=generation.truncated,
        max_new_tokens=max_new_tokens,
        transcripts=texts,
        trajectory_rewards=None if trajectories is None else torch.tensor([t.reward for t in trajectories]),
    )


def _cat(tensors: list[Tensor], pad_value: int | bool, left: bool = False) -> Tensor:
    width = max(t.shape[1] for t in tensors)
    padded = [
        torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=pad_value)
        for t in tensors
    ]
    return torch.cat(padded)


def _join_routes(groups: list[dict], prompt_width: int, response_width: int) -> tuple[Tensor | None, Tensor | None]:
    """The groups' engine routes (n, L, P_g+T_g, k) in the batch's columns: each prompt part left-padded to
    ``prompt_width``, each response part right-padded to ``response_width`` (padding columns unrouted)."""
    if any(gr["routes"] is None for gr in groups):
        return None, None
    routes, masks = [], []
    for gr in groups:
        p, t = gr["prompt_ids"].shape[1], gr["response_ids"].shape[1]
        pad = (prompt_width - p, response_width - t)
        r, m = gr["routes"], gr["route_mask"]
        routes.append(torch.cat([F.pad(r[:, :, :p], (0, 0, pad[0], 0)), F.pad(r[:, :, p:], (0, 0, 0, pad[1]))], 2))
        masks.append(torch.cat([F.pad(m[:, :p], (pad[0], 0)), F.pad(m[:, p:], (0, pad[1]))], 1))
    return torch.cat(routes), torch.cat(masks)


class RolloutCollector:
    """Generates and scores groups until it has ``num_prompts`` of them, then builds the batch.

    Args:
        engine: the rollout engine (already configured and bound).
        sampler: how sequences are produced from the engine (single turn by default, or multi-turn trajectories).
        tokenizer: the policy's tokenizer.
        rewards / reward_weights: the reward functions and their weights.
        num_samples: G.
        max_new_tokens: the generation limit.
        dynamic_sampling: drop groups whose rewards are all equal and sample replacements.
        max_sampling_rounds: generation rounds per step with dynamic sampling; when they do not yield
            enough informative groups, the batch is filled with the dropped ones (advantage 0), so every
            rank keeps the same batch size.
    """

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        rewards: Sequence[Reward],
        reward_weights: Sequence[float] | None,
        num_samples: int,
        max_new_tokens: int,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 3,
        sampler: Sampler | None = None,
    ) -> None:
        self.engine = engine
        self.sampler = sampler or Sampler(engine)
        self.tokenizer = tokenizer
        self.rewards = list(rewards)
        self.reward_weights = reward_weights
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.dynamic_sampling = dynamic_sampling
        self.max_sampling_rounds = max_sampling_rounds

    def collect(self, next_prompts: Callable[[int], list[EncodedPrompt]], num_prompts: int) -> RolloutBatch:
        """Build one rollout batch of ``num_prompts`` groups, drawing prompts from ``next_prompts(k)``."""
        g = self.num_samples
        kept: list[dict] = []
        dropped: list[dict] = []
        gen_time = reward_time = 0.0
        rounds = 0
        total_groups = zero_std_groups = 0
        while len(kept) < num_prompts:
            rounds += 1
            prompts = next_prompts(num_prompts - len(kept))
            start = time.perf_counter()
            generation = self.sampler.sample(prompts, g)
            gen_time += time.perf_counter() - start
            start = time.perf_counter()
            completions = decode_responses(self.tokenizer, generation)
            texts = transcripts(self.tokenizer, generation)
            inputs = reward_inputs(prompts, generation, completions, g, self.max_new_tokens, texts)
            total, terms = compute_rewards(self.rewards, self.reward_weights, inputs)
            reward_time += time.perf_counter() - start
            group_ids = torch.arange(len(prompts)).repeat_interleave(g)
            _, std, _ = group_stats(total, group_ids)
            informative = (std.view(-1, g)[:, 0] > 0).tolist()
            total_groups += len(prompts)
            zero_std_groups += len(prompts) - sum(informative)
            for i, prompt in enumerate(prompts):
                rows = slice(i * g, (i + 1) * g)
                group = {
                    "prompt": prompt,
                    "prompt_ids": generation.prompt_ids[rows],
                    "prompt_mask": generation.prompt_mask[rows],
                    "response_ids": generation.response_ids[rows],
                    "response_mask": generation.response_mask[rows],
                    "loss_mask": generation.sampled_mask[rows],
                    "trajectories": None if generation.trajectories is None else generation.trajectories[rows],
                    "truncated": generation.truncated[rows],
                    "logprobs": None if generation.logprobs is None else generation.logprobs[rows],
                    "routes": None if generation.routes is None else generation.routes[rows],
                    "route_mask": None if generation.route_mask is None else generation.route_mask[rows],
                    "rewards": total[rows],
                    "terms": {k: v[rows] for k, v in terms.items()},
                    "completions": (texts or completions)[rows],
                }
                (kept if informative[i] or not self.dynamic_sampling else dropped).append(group)
            if self.dynamic_sampling and rounds >= self.max_sampling_rounds and len(kept) < num_prompts:
                kept.extend(dropped[: num_prompts - len(kept)])
        batch = self._assemble(kept[:num_prompts])
        batch.metrics.update(
            {
                "time/generate_s": gen_time,
                "time/reward_s": reward_time,
                "rollout/zero_std_group_frac": zero_std_groups / max(total_groups, 1),
                "rollout/sampling_rounds": float(rounds),
            }
        )
        return batch

    def _assemble(self, groups: list[dict]) -> RolloutBatch:
        pad = self.tokenizer.pad_token_id
        prompt_ids = _cat([gr["prompt_ids"] for gr in groups], pad, left=True)
        prompt_mask = _cat([gr["prompt_mask"] for gr in groups], False, left=True)
        response_ids = _cat([gr["response_ids"] for gr in groups], pad)
        response_mask = _cat([gr["response_mask"] for gr in groups], False)  # every real token after the prompt
        loss_mask = _cat([gr["loss_mask"] for gr in groups], False)  # the sampled ones
        logprobs = None
        if all(gr["logprobs"] is not None for gr in groups):
            logprobs = _cat([gr["logprobs"] for gr in groups], 0).float().masked_fill(~loss_mask, 0.0)
        rewards = torch.cat([gr["rewards"] for gr in groups])
        routes, route_mask = _join_routes(groups, prompt_ids.shape[1], response_ids.shape[1])
        g = self.num_samples
        batch = RolloutBatch(
            input_ids=torch.cat([prompt_ids, response_ids], 1),
            attention_mask=torch.cat([prompt_mask, response_mask], 1),
            response_mask=loss_mask,
            rewards=rewards,
            group_ids=torch.arange(len(groups)).repeat_interleave(g),
            rollout_logprobs=logprobs,
            rollout_routing=routes,
            rollout_routing_mask=route_mask,
            truncated=torch.cat([gr["truncated"] for gr in groups]),
            reward_terms={k: torch.cat([gr["terms"][k] for gr in groups]) for k in groups[0]["terms"]},
            prompts=[gr["prompt"].record.text for gr in groups for _ in range(g)],
            completions=[c for gr in groups for c in gr["completions"]],
            answers=[gr["prompt"].record.answer for gr in groups for _ in range(g)],
            prompt_index=torch.tensor([gr["prompt"].record.index for gr in groups]).repeat_interleave(g),
            engine_is_policy=self.engine.generates_with_policy,
        )
        batch.metrics.update(rollout_metrics(batch))
        if groups[0]["trajectories"] is not None:
            batch.metrics.update(agent_metrics([t for gr in groups for t in gr["trajectories"]]))
        return batch


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """``rollout/*`` statistics of a batch, as floats."""
    lengths = batch.response_lengths.float()
    metrics = {
        "rollout/reward_mean": batch.rewards.mean().item(),
        "rollout/reward_std": batch.rewards.std().item() if len(batch) > 1 else 0.0,
        "rollout/response_length_mean": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/truncated_frac": batch.truncated.float().mean().item() if batch.truncated is not None else 0.0,
    }
    metrics.update({f"rollout/reward_{k}": v.float().mean().item() for k, v in batch.reward_terms.items()})
    return metrics
