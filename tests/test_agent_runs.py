"""Multi-turn runs through the CLI: each way in trains, a resumed multi-turn run equals the uninterrupted one,
bad agent configuration is refused at setup in one line."""

from __future__ import annotations

import sys

import pytest
import torch
from support import ROOT, scalars, tiny_args, tool_args
from test_resume import RecordRollouts, _last

from gspo_lightning.cli import cli_main

AGENT_METRICS = (
    "rollout/turns_mean", "rollout/tool_calls_mean", "rollout/tool_errors_frac", "rollout/env_token_frac",
    "rollout/end_done_frac", "rollout/end_max_turns_frac", "rollout/end_budget_frac", "rollout/end_length_frac",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


def _run(root, *extra, max_steps=2):
    RecordRollouts.batches.clear()
    cli = cli_main(
        ["fit", *tool_args(root, "--trainer.callbacks+=test_resume.RecordRollouts", *extra, max_steps=max_steps)]
    )
    return list(RecordRollouts.batches), cli


def test_the_tool_demo_config_trains_and_logs_the_agent_metrics(tmp_path):
    _, cli = _run(tmp_path)
    assert cli.trainer.global_step == 2
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    for name in AGENT_METRICS:
        assert name in logged, name
    ends = sum(logged[f"rollout/end_{r}_frac"][0].value for r in ("done", "max_turns", "budget", "length"))
    assert ends == pytest.approx(1.0)


def test_an_environment_run_is_multi_turn_and_trains_on_the_model_tokens_only(tmp_path):
    batches, _ = _run(
        tmp_path, "--data.tools", "null", "--data.environment", "agent_envs.ThreeTurns",
        "--data.rewards", "[TrajectoryReward]", "--data.agent.max_tokens", "null",
    )  # fmt: skip
    logged = scalars(tmp_path / "lightning_logs" / "version_0")
    turns = logged["rollout/turns_mean"][0].value
    assert turns > 1.0 and logged["rollout/env_token_frac"][0].value > 0
    # a trajectory's return sums its turns' rewards: 0.5 per answered turn, 1 when the third turn ends it
    rewards = torch.tensor(batches[0]["rewards"])
    assert all(r in (0.0, 0.5, 1.0, 2.0) for r in rewards.tolist()) and rewards.max() > 0
    assert logged["rollout/trajectory_reward_mean"][0].value == pytest.approx(rewards.mean().item())


def test_a_rollout_function_run_trains(tmp_path):
    batches, cli = _run(
        tmp_path, "--data.tools", "null", "--data.rollout_function", "agent_envs.one_turn",
        "--data.rewards", "[TrajectoryReward]",
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    assert batches and all(r > 0 for r in batches[0]["rewards"])


def test_a_resumed_multi_turn_run_equals_the_uninterrupted_one(tmp_path):
    env = (
        "--data.tools",
        "null",
        "--data.environment",
        "agent_envs.ThreeTurns",
        "--data.rewards",
        "[TrajectoryReward]",
    )
    straight, straight_cli = _run(tmp_path / "straight", *env, max_steps=6)
    assert any(len(set(b["tokens"][0])) > 1 for b in straight)
    first, _ = _run(tmp_path / "run", *env, max_steps=2)
    assert first == straight[:1]
    # the README's resume command: the same command, a later max_steps, --ckpt_path last
    resumed, _ = _run(tmp_path / "run", *env, "--ckpt_path", "last", max_steps=6)
    assert [b["step"] for b in resumed] == [4, 6]
    for got, expected in zip(resumed, straight[1:], strict=True):
        assert got["tokens"] == expected["tokens"] and got["rewards"] == expected["rewards"]
    final = torch.load(_last(tmp_path / "run", version=1), weights_only=False)["state_dict"]
    for name, value in straight_cli.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data.tools", "[agent_envs.untyped]"), r"Tool untyped cannot be described .* type hint"),
        (("--data.environment", "agent_envs.ThreeTurns"), r"data.tools and data.environment are both set"),
        (("--data.agent.parser", "NoSuchParser"), r"data.agent.parser='NoSuchParser' is not a tool-call parser"),
        (("--data.agent.max_tokens", "4096"), r"data.agent.max_tokens=4096 exceeds the model's context"),
    ],
    ids=["untyped-tool", "two-ways", "parser", "budget"],
)
def test_bad_agent_configuration_is_refused_at_setup_in_one_line(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message) as info:
        cli_main(["fit", *tool_args(tmp_path, *extra)])
    assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_tools_with_a_tokenizer_without_chat_template_are_refused(tmp_path):
    args = tiny_args(tmp_path, "--data.tools", "[gspo_lightning.demo.tools.multiply]")
    with pytest.raises(ValueError, match=r"data.tools needs a tokenizer whose chat template renders tools") as info:
        cli_main(["fit", *args])
    assert "\n" not in str(info.value)


def test_the_tool_demo_config_is_shipped():
    assert (ROOT / "configs" / "tool_demo.yaml").exists()


def test_a_tool_that_does_not_import_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", *tool_args(tmp_path, "--data.tools", "[gspo_lightning.demo.tools.nosuch]")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.tools: cannot import gspo_lightning.demo.tools.nosuch (module ")
    assert not any("usage:" in line for line in err)
