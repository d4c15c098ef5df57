"""Components picked in YAML through jsonargparse class_path/init_args: short names and import paths."""

import sys
import textwrap

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from support import tiny_args

import gspo_lightning as gl
from gspo_lightning import Advantage, Clip, PolicyObjective, Ratio
from gspo_lightning.cli import DEMO_CONFIG, cli_main


def _parser():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PolicyObjective, "objective")
    parser.add_argument("--advantage", type=Advantage)
    return parser


GSPO_YAML = """
objective:
  ratio: SequenceRatio
  clip:
    class_path: PPOClip
    init_args: {eps_low: 3.0e-4, eps_high: 4.0e-4}
  aggregation: seq-mean-token-mean
advantage:
  class_path: GroupNormAdvantage
  init_args: {scale: batch}
"""


def test_short_names_for_builtins():
    parser = _parser()
    cfg = parser.parse_string(GSPO_YAML)
    init = parser.instantiate_classes(cfg)
    objective = init.objective
    assert isinstance(objective.ratio, gl.SequenceRatio) and objective.ratio.length_normalize
    assert isinstance(objective.clip, gl.PPOClip) and objective.clip.eps_high == 4e-4
    assert isinstance(init.advantage, gl.GroupNormAdvantage) and init.advantage.scale == "batch"


def test_bad_init_arg_is_reported():
    with pytest.raises(Exception, match="eps_hi"):
        _parser().parse_string(GSPO_YAML.replace("eps_high", "eps_hi"))


def test_user_components_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rl_parts.py").write_text(
        textwrap.dedent(
            '''
            import torch
            from gspo_lightning import Ratio, Clip, ClipOutput


            class HalfTokenRatio(Ratio):
                """Half of the token log ratio."""

                def __init__(self, factor: float = 0.5):
                    super().__init__()
                    self.factor = factor

                def forward(self, logprobs, old_logprobs, response_mask):
                    return self.factor * (logprobs - old_logprobs) * response_mask


            class HingeClip(Clip):
                """A user's own surrogate."""

                def forward(self, log_ratio, advantages):
                    ratio = log_ratio.exp()
                    adv = advantages[:, None].expand_as(ratio)
                    none = torch.zeros_like(ratio, dtype=torch.bool)
                    loss = torch.relu(1 - ratio * adv)
                    return ClipOutput(loss=loss, ratio=ratio, clipped_low=none, clipped_high=none)
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_text = """
    objective:
      ratio:
        class_path: my_rl_parts.HalfTokenRatio
        init_args: {factor: 0.25}
      clip: my_rl_parts.HingeClip
    """
    parser = _parser()
    init = parser.instantiate_classes(parser.parse_string(textwrap.dedent(cfg_text)))
    objective = init.objective
    assert type(objective.ratio).__name__ == "HalfTokenRatio" and objective.ratio.factor == 0.25
    assert "HalfTokenRatio" not in gl.RATIOS  # no registration happened
    lp = torch.zeros(2, 3, requires_grad=True)
    out = objective(lp, torch.zeros(2, 3), torch.tensor([1.0, 2.0]), torch.ones(2, 3, dtype=torch.bool))
    out.loss.backward()
    assert torch.isfinite(lp.grad).all()


def test_dump_round_trip():
    parser = _parser()
    cfg = parser.parse_string(GSPO_YAML)
    dumped = yaml.safe_load(parser.dump(cfg))
    assert dumped["objective"]["ratio"]["class_path"].endswith("SequenceRatio")
    assert parser.parse_string(parser.dump(cfg)) == cfg


def test_component_types_are_exported():
    assert issubclass(gl.DualClip, Clip) and issubclass(gl.SequenceTokenRatio, Ratio)


@pytest.fixture()
def bare_argv(monkeypatch):
    """No pytest arguments in sys.argv for LightningCLI to warn about next to ``args``."""
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


@pytest.mark.usefixtures("bare_argv")
@pytest.mark.parametrize(
    ("args", "suggestion"),
    [
        (["--model.ratio", "SequenceRatoi"], "unknown ratio 'SequenceRatoi'; did you mean 'SequenceRatio'?"),
        (["--model.clip.class_path", "PPOClp"], "unknown clip 'PPOClp'; did you mean 'PPOClip'?"),
        (["--data.engine", "TransformerEngine"], "did you mean 'TransformersEngine'?"),
        (["--model.ratio", "PPOClip"], "'PPOClip' is a clip, not a ratio"),
    ],
)
def test_misspelled_component_suggests_the_nearest_name(capsys, args, suggestion):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(DEMO_CONFIG), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, f"one line, no usage dump:\n{err}"
    assert suggestion in err and "gspo-lightning list" in err and "Expected a dot import path" not in err


@pytest.mark.usefixtures("bare_argv")
def test_misspelled_reward_in_yaml_suggests_the_nearest_name(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  rewards:\n    - class_path: ExactMatchRewad\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(DEMO_CONFIG), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'ExactMatchReward'?" in err and "gspo-lightning list reward" in err


@pytest.mark.usefixtures("bare_argv")
def test_max_steps_that_is_not_a_multiple_of_a_rollout_batch_warns(tmp_path):
    # 2 mini-batches x 1 epoch per rollout batch: max_steps=3 ends after 2 rollout batches, at step 4
    with pytest.warns(UserWarning, match=r"trainer.max_steps=3 .* rounds up to 4"):
        cli = cli_main(["fit", *tiny_args(tmp_path, max_steps=3)])
    assert cli.trainer.global_step == 4
