"""Checks of the parsed configuration before anything is built: Trainer options that overlap the module's own."""

import pytest

from gspo_lightning.cli import cli_main
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
