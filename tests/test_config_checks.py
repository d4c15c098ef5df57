"""Checks of the parsed configuration before anything is built: Trainer options that overlap the module's own."""

import sys

import pytest

from gspo_lightning.cli import DEMO_CONFIG, cli_main, main
from gspo_lightning.config_checks import check_trainer_overlaps


@pytest.mark.parametrize(
    ("args", "ours"),
    [
        (["--trainer.gradient_clip_val", "1.0"], "model.update.max_grad_norm"),
        (["--trainer.gradient_clip_algorithm", "value"], "model.update.max_grad_norm"),
        (["--trainer.accumulate_grad_batches", "4"], "model.batching.micro_batch_size"),
        (["--trainer.max_epochs", "3"], "trainer.max_steps"),
    ],
)
def test_a_trainer_option_that_overlaps_ours_is_refused_naming_ours(capsys, args, ours):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args, "--trainer.max_steps", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: trainer.{args[0].split('.')[1]}=") and ours in err[-1], err


@pytest.mark.parametrize("args", [[], ["--trainer.max_epochs", "-1", "--trainer.accumulate_grad_batches", "1"]])
def test_the_defaults_and_max_epochs_minus_one_pass(args):
    cli = cli_main(args, run=False)
    check_trainer_overlaps(cli.config)  # no SystemExit
    with pytest.raises(SystemExit):
        check_trainer_overlaps(cli_main([*args, "--trainer.gradient_clip_val", "0.5"], run=False).config)


def test_a_rollout_batch_too_small_for_its_mini_batches_is_refused_before_a_model_loads(capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("gspo_lightning.training.policy.load_policy", lambda *a, **k: loads.append(a))
    args = [
        "--data.rollout.prompts_per_step",
        "2",
        "--data.rollout.num_samples",
        "2",
        "--model.update.mini_batches",
        "8",
    ]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args])
    assert exit_info.value.code == 2 and not loads
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds 4 sequences" in err and "model.update.mini_batches=8" in err, err


@pytest.mark.parametrize(
    ("text", "where"),
    [("model:\n  policy: {path: x\n  bad: [1, 2\n", "line 3, column 6"), ("model:\n\tpolicy: 1\n", "line 2, column 1")],
)
def test_a_config_file_that_is_not_yaml_is_named_with_the_place(tmp_path, capsys, monkeypatch, text, where):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])  # main() rewrites sys.argv: restored after the test
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO_CONFIG), "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --config {bad}: not valid YAML: ") and where in err[-1], err
