"""How far the trainer's MoE routing and log-probs are from the rollout engine's, without and with R3.

For one rollout batch sampled by an engine that reports its routes, the trainer's pi_old pass runs twice on the
same weights: routing naturally (``routing_replay: off``) and forcing the engine's experts (``rollout``, R3).
Printed per run: the fraction of (response position, MoE layer) pairs whose top-k set the trainer's routers
choose differently from the engine's (``moe/rollout_routing_mismatch_frac``, per layer too), the share of
response positions the engine reported no route for, and the log-prob gap ``|pi_old - pi_rollout|``
(``sampling/logprob_diff_mean|max``) that R3 should shrink to the kernels' own numerics.

    # vLLM (CPU here: in the venv .ci/vllm_env.sh builds)
    VLLM_ENABLE_V1_MULTIPROCESSING=0 ~/.cache/gspo_lightning/venv-vllm/bin/python benchmarks/routing_mismatch.py
    python benchmarks/routing_mismatch.py --engine TransformersEngine   # the embedded engine: 0 by construction
"""

from __future__ import annotations

import argparse

import torch

from gspo_lightning.data import AdditionTask
from gspo_lightning.engines import ENGINES, SamplingConfig
from gspo_lightning.module import GSPOModule
from gspo_lightning.moe.routing import rollout_mismatch_counts
from gspo_lightning.rollout import PolicyLink, RolloutDataModule, RolloutOptions
from gspo_lightning.training.options import MoEOptions, PolicyOptions, UpdateOptions


def rollout_batch(model: str, engine_name: str, prompts: int, samples: int, max_new_tokens: int, policy):
    """One rollout batch with the engine's routes, sampled from ``policy``'s weights."""
    engine = ENGINES.get(engine_name)()
    dm = RolloutDataModule(
        prompts=AdditionTask(num_train=max(prompts, 8), num_val=4, seed=0),
        tokenizer=model,
        rollout=RolloutOptions(prompts_per_step=prompts, num_samples=samples),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens),
        engine=engine,
    )
    dm.setup("fit")
    dm.connect(PolicyLink(policy, report_routes=True))
    torch.manual_seed(0)
    batch = dm.next_rollout()
    if hasattr(engine, "shutdown"):
        engine.shutdown()
    return batch


def trainer_pass(module: GSPOModule, batch) -> dict[str, float]:
    """The pi_old pass on ``batch``: mismatch per layer, unrouted share, log-prob gap to the engine."""
    result = module.pre_update(batch, module.policy, None, module.routing)
    differing, routed, unrouted = result.rollout_mismatch
    per_layer = (differing / routed.clamp(min=1)).tolist()
    gap = (result.old_logprobs - batch.rollout_logprobs).abs()[batch.response_mask]
    return {
        "mismatch_frac": sum(per_layer) / len(per_layer),
        "mismatch_per_layer": per_layer,
        "unrouted_frac": float(unrouted) / max(float(routed + unrouted), 1.0),
        "logprob_diff_mean": float(gap.mean()),
        "logprob_diff_max": float(gap.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="+", default=["builtin:tiny-qwen3-moe-addition", "builtin:tiny-qwen3-moe-random"]
    )
    parser.add_argument("--engine", default="VLLMEngine")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="the policy's (and so the engine's) dtype")
    args = parser.parse_args()
    print(
        f"engine {args.engine}, {args.dtype}; {args.prompts} prompts x {args.samples} samples,"
        f" up to {args.max_new_tokens} tokens"
    )
    for model in args.model:
        modules = {
            mode: GSPOModule(
                policy=PolicyOptions(path=model, dtype=args.dtype),
                moe=MoEOptions(routing_replay=mode),
                update=UpdateOptions(mini_batches=2),
            )
            for mode in ("off", "rollout")
        }
        for module in modules.values():
            module.configure_model()
        batch = rollout_batch(
            model, args.engine, args.prompts, args.samples, args.max_new_tokens, modules["off"].policy
        )
        tokens = int(batch.response_mask.sum())
        print(f"\n{model}: {len(batch)} sequences, {tokens} response tokens")
        print(f"{'trainer pass':<22}{'mismatch':>10}{'unrouted':>10}{'|dlogp| mean':>14}{'max':>10}   per layer")
        for mode, module in modules.items():
            r = trainer_pass(module, batch)
            layers = " ".join(f"{x:.4f}" for x in r["mismatch_per_layer"])
            label = "routing naturally" if mode == "off" else "R3 (engine's routes)"
            print(
                f"{label:<22}{r['mismatch_frac']:>10.4f}{r['unrouted_frac']:>10.4f}"
                f"{r['logprob_diff_mean']:>14.2e}{r['logprob_diff_max']:>10.2e}   {layers}"
            )
        # the routes must line up with the trainer's positions: a one-column shift is far off
        shifted = rollout_mismatch_counts(
            batch.rollout_routing.roll(1, dims=2), batch.rollout_routing_mask, batch.rollout_routing,
            batch.response_mask,
        )  # fmt: skip
        control = float((shifted[0] / shifted[1]).mean())
        print(f"(control: the engine's routes shifted by one column differ at {control:.3f})")


if __name__ == "__main__":
    main()
