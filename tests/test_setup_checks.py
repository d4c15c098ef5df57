"""Options refused at setup, before any generation: limits the model cannot hold, kernels the trainer cannot use."""

import pytest
from support import tiny_args

from gspo_lightning.cli import cli_main


def test_a_generation_limit_past_the_models_context_is_refused_at_setup(tmp_path):
    """The tiny model has 64 positions: 100000 new tokens would run past them (or hang the first evaluation)."""
    with pytest.raises(ValueError, match=r"data.sampling.max_new_tokens=100000 does not fit .* at most \d+"):
        cli_main(["fit", *tiny_args(tmp_path, "--data.sampling.max_new_tokens", "100000")])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_generation_limit_that_fits_is_kept(tmp_path):
    cli = cli_main(["fit", *tiny_args(tmp_path, "--data.sampling.max_new_tokens", "40", max_steps=2)])
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize("kernel", ["paged|eager", "paged|sdpa", "nonsense"])
def test_attention_kernels_the_trainer_cannot_use_are_refused(tmp_path, kernel):
    with pytest.raises(ValueError, match=r"model.policy.attn_implementation=.* pick one of eager, sdpa"):
        cli_main(["fit", *tiny_args(tmp_path, "--model.policy.attn_implementation", kernel)])


def test_flex_attention_on_the_cpu_is_refused_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match="model.policy.attn_implementation=flex_attention needs a GPU"):
        cli_main(["fit", *tiny_args(tmp_path, "--model.policy.attn_implementation", "flex_attention")])
