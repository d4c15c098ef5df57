"""End to end through the real CLI on a tiny model: what a user looks at after ``gspo-lightning fit``."""

import json
import textwrap

import pytest
import torch
from support import ROOT, CountingEngine, RecordBatches, scalars, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gspo_lightning.cli import cli_main

pytest_plugins = ["lightning_log"]  # the lightning_log fixture

REQUIRED_TAGS = [
    "rollout/reward_mean",
    "rollout/reward_std",
    "rollout/zero_std_group_frac",
    "rollout/response_length_mean",
    "rollout/truncated_frac",
    "policy/loss",
    "policy/clip_frac_token",
    "policy/clip_frac_seq",
    "policy/ratio_mean",
    "policy/ratio_max",
    "policy/entropy",
    "policy/grad_norm",
    "time/generate_s",
    "time/train_s",
    "throughput/tokens_per_s",
    "val/accuracy",
    "moe/load_imbalance",
    "moe/router_entropy",
    "moe/routing_change_frac",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    cli_main(["fit", *tiny_args(root, "--trainer.callbacks+=HFExport")])
    return root


def test_fit_writes_tensorboard_tags_samples_and_report(fitted):
    log_dir = fitted / "lightning_logs" / "version_0"
    tags = scalars(log_dir)
    missing = [t for t in REQUIRED_TAGS if t not in tags]
    assert not missing, f"missing TensorBoard tags: {missing}"
    acc = EventAccumulator(str(next(log_dir.glob("events.out.tfevents.*"))))
    acc.Reload()
    assert "samples/completions/text_summary" in acc.Tags()["tensors"]
    report = json.loads((log_dir / "heldout_report.json").read_text())
    assert set(report) == {"before", "after", "optimizer_steps"} and report["optimizer_steps"] == 4
    assert (log_dir / "checkpoints" / "last.ckpt").exists()


def test_hf_export_loads_with_from_pretrained(fitted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = fitted / "lightning_logs" / "version_0" / "hf_export" / "final"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ckpt = torch.load(fitted / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    trained = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    assert tokenizer.decode(tokenizer("12+34=")["input_ids"]) == "12+34="


def test_resume_continues_at_the_right_step_and_prompt(fitted, tmp_path):
    ckpt_path = fitted / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["global_step"] == 4
    state = ckpt["RolloutDataModule"]
    assert state["steps"] == 2 and state["cursor"] == 8  # 2 rollout batches of 4 prompts
    RecordBatches.prompt_indices.clear()
    resume = tiny_args(tmp_path, "--trainer.callbacks+=support.RecordBatches", max_steps=8)
    cli = cli_main(["fit", *resume, "--ckpt_path", str(ckpt_path)])
    assert cli.trainer.global_step == 8
    assert cli.datamodule.steps == 4 and cli.datamodule.cursor == 16
    # the prompts the resumed run trained on are the ones after the checkpoint's position
    order = cli.datamodule._rank_order(0)
    assert RecordBatches.prompt_indices[0][0] == order[8].record.index
    assert RecordBatches.prompt_indices[-1][0] == order[12].record.index


def test_grpo_preset_stacks_on_the_demo(tmp_path):
    grpo = ROOT / "configs" / "algorithms" / "grpo.yaml"
    cli = cli_main(["fit", *tiny_args(tmp_path, "--config", str(grpo), max_steps=2)])
    assert type(cli.model.objective.ratio).__name__ == "TokenRatio"
    assert cli.model.objective.kl_coef == 0.04 and cli.model.reference is not None
    assert "policy/kl" in scalars(tmp_path / "lightning_logs" / "version_0")


NEW_PRESETS = {  # preset -> a metric only its components log (None: the clip slot, seen in the loss alone)
    "sapo": None,
    "cispo": None,
    "gmpo": None,
    "dppo_tv": "policy/dppo_masked_frac",
    "dppo_kl": "policy/dppo_divergence_mean",
    "opsm": "policy/opsm_divergence_mean",
    "forking_tokens": "policy/forking_kept_frac",
    "clip_cov": "policy/clip_cov_frac",
    "kl_cov": "policy/kl_cov_frac",
}


@pytest.mark.parametrize("name", list(NEW_PRESETS))
def test_each_2025_preset_trains_on_the_demo(tmp_path, name):
    preset = ROOT / "configs" / "algorithms" / f"{name}.yaml"
    two_steps_a_batch = ("--model.update.mini_batches", "2")  # after the preset's 4: two rollout batches
    # the demo's warmed-up model (30% right): rewards differ within groups, so advantages and gradients are not 0
    demo_model = ("--model.policy.path", "builtin:tiny-qwen3-moe-addition")
    cli_main(["fit", *tiny_args(tmp_path, "--config", str(preset), *two_steps_a_batch, *demo_model, max_steps=4)])
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    losses = [e.value for e in logged["policy/loss"]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), losses
    assert all(e.value > 0 for e in logged["policy/grad_norm"]), logged["policy/grad_norm"]
    if NEW_PRESETS[name] is not None:
        assert NEW_PRESETS[name] in logged, sorted(logged)


def test_custom_component_and_reward_from_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "my_plugins.py").write_text(
        textwrap.dedent(
            '''
            import torch
            from gspo_lightning import Ratio
            from gspo_lightning.rewards import Reward

            CALLS = {"ratio": 0, "reward": 0}


            class HalfRatio(Ratio):
                """Half the token log ratio."""

                def forward(self, logprobs, old_logprobs, response_mask):
                    CALLS["ratio"] += 1
                    return 0.5 * (logprobs - old_logprobs) * response_mask


            class LengthReward(Reward):
                """Longer is better."""

                def score(self, inputs):
                    CALLS["reward"] += 1
                    return inputs.response_lengths.float()


            def digit_count(prompts, completions, answers):
                return [sum(ch.isdigit() for ch in c) for c in completions]
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "plugins.yaml"
    config.write_text(
        textwrap.dedent(
            """
            model:
              ratio: my_plugins.HalfRatio
            data:
              rewards:
                - my_plugins.LengthReward
                - class_path: FunctionReward
                  init_args: {fn: my_plugins.digit_count}
            """
        )
    )
    cli = cli_main(["fit", *tiny_args(tmp_path, "--config", str(config), max_steps=2)])
    import my_plugins

    assert my_plugins.CALLS["ratio"] > 0 and my_plugins.CALLS["reward"] > 0
    assert type(cli.model.objective.ratio).__name__ == "HalfRatio"
    tags = scalars(tmp_path / "lightning_logs" / "version_0")
    assert "rollout/reward_LengthReward" in tags and "rollout/reward_digit_count" in tags


def test_validate_subcommand_reports_accuracy(tmp_path):
    cli = cli_main(["validate", *tiny_args(tmp_path)])
    metrics = cli.trainer.callback_metrics
    assert "val/accuracy" in metrics and "val/accuracy_sampled" in metrics and "val/pass@4" in metrics


def test_training_options_run_together(tmp_path):
    scheduler = (
        '{"class_path": "torch.optim.lr_scheduler.LinearLR",'
        ' "init_args": {"start_factor": 1.0, "end_factor": 0.5, "total_iters": 4}}'
    )
    cli = cli_main(
        [
            "fit",
            *tiny_args(tmp_path),
            "--model.policy.gradient_checkpointing",
            "true",
            "--model.lr_scheduler",
            scheduler,
            "--model.loss.entropy_coef",
            "0.01",
            "--model.batching.micro_batch_size",
            "3",
            "--model.update.epochs",
            "2",
            "--data.rollout.dynamic_sampling",
            "true",
        ]
    )
    assert cli.trainer.global_step == 4  # 2 mini-batches x 2 epochs per rollout batch: one rollout batch
    assert cli.model.policy.is_gradient_checkpointing
    lr = cli.model.optimizers().param_groups[0]["lr"]
    assert lr == pytest.approx(3e-4 * 0.5)


def test_routing_replay_from_the_cli_still_measures_routing_change(tmp_path):
    # with replay the update routes as pi_old did; the metric compares the routers' own choice with pi_old's,
    # measured from the second mini-batch on (the first runs on pi_old's weights)
    cli_main(["fit", *tiny_args(tmp_path, "--model.moe.routing_replay", "true", max_steps=4)])
    values = [e.value for e in scalars(tmp_path / "lightning_logs" / "version_0")["moe/routing_change_frac"]]
    assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)


def test_the_policy_is_bound_once_per_run_and_synced_once_per_update(tmp_path):
    CountingEngine.binds.clear()
    CountingEngine.syncs.clear()
    # 3 rollout batches with a validation after the 2nd, held-out reports before and after training
    cli = cli_main(["fit", *tiny_args(tmp_path, "--data.engine", "support.CountingEngine", max_steps=6)])
    policy = id(cli.model.policy)
    assert CountingEngine.binds == [policy], "one bind per run, whoever generates first"
    assert CountingEngine.syncs == [policy] * 3, "one weight push per rollout batch, none for evaluations"
    assert "time/weight_sync_s" not in scalars(tmp_path / "lightning_logs" / "version_0"), "nothing is copied"


def test_a_diverging_run_stops_clearly_and_writes_no_broken_checkpoint(tmp_path):
    # lr 1e30: the first step blows the weights up; the run must stop before generating with them
    optimizer = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 1e30}}'
    odd_digits = '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]'  # non-zero advantages
    args = tiny_args(tmp_path, "--model.optimizer", optimizer, "--data.rewards", odd_digits, max_steps=8)
    args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2"]
    with pytest.raises(RuntimeError, match="non-finite"):
        cli_main(["fit", *args])
    for path in tmp_path.rglob("*.ckpt"):
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


def test_non_finite_gradients_are_skipped_then_stop_the_run(tiny_path, rollout):
    from support import built_module, prepared

    module = built_module(tiny_path, mini_batches=2, max_nonfinite_steps=2)
    batch = prepared(module, rollout)
    for p in module.policy.parameters():
        p.grad = torch.full_like(p, float("nan"))
    norm = torch.tensor(float("nan"))
    assert module.nonfinite_guard(norm, True, module.policy) is True
    assert all(p.grad is None for p in module.policy.parameters()), "the optimizer must see no gradient"
    assert module.nonfinite_guard(torch.tensor(1.0), False, module.policy) is False  # a finite step resets
    module.nonfinite_guard(norm, True, module.policy)
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had a non-finite gradient"):
        module.nonfinite_guard(norm, True, module.policy)
    assert len(batch) == 16


# -- issue 22, 10: the final policy as a Hugging Face folder by default --------------------------------------
def test_fit_leaves_the_final_policy_as_a_hugging_face_folder_by_default(tmp_path, lightning_log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli_main(["fit", *tiny_args(tmp_path, max_steps=2)])  # no HFExport configured
    run = tmp_path / "lightning_logs" / "version_0"
    folder = run / "hf_export" / "final"
    model = AutoModelForCausalLM.from_pretrained(folder)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    trained = {k.removeprefix("policy."): v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
    assert trained.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("1+2=")["input_ids"]) == "1+2="
    said = [r.getMessage() for r in lightning_log.records if str(folder) in r.getMessage()]
    assert len(set(said)) == 1 and "from_pretrained" in said[0]  # (a record may reach caplog twice under pytest)


def test_the_final_hugging_face_folder_can_be_switched_off(tmp_path):
    off = ["--trainer.callbacks+=HFExport", "--trainer.callbacks.final=false"]
    cli_main(["fit", *tiny_args(tmp_path, *off, max_steps=2)])
    assert (tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").exists()
    assert not list(tmp_path.rglob("hf_export")), "opting out writes no folder"
