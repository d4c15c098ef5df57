"""Every shipped YAML parses through the real CLI parser; CPU-runnable ones also instantiate."""

from pathlib import Path

import pytest

from gspo_lightning.cli import CONFIG_DIR, DEMO_CONFIG, cli_main, with_demo_default

ALL = sorted(CONFIG_DIR.rglob("*.yaml"))
PRESETS = sorted((CONFIG_DIR / "algorithms").glob("*.yaml"))
GPU_ONLY = [p for p in ALL if "accelerator: gpu" in p.read_text()]


def test_configs_are_shipped_and_linked_from_the_repo_root():
    names = {p.relative_to(CONFIG_DIR).as_posix() for p in ALL}
    assert {"demo.yaml", "algorithms/gspo.yaml", "algorithms/grpo.yaml", "algorithms/dapo.yaml"} <= names
    assert {"algorithms/gspo_token.yaml", "algorithms/dr_grpo.yaml", "qwen3_30b_a3b.yaml"} <= names
    assert (Path(__file__).parents[1] / "configs" / "demo.yaml").resolve() == DEMO_CONFIG.resolve()


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_config_parses(path, capsys):
    configs = [path] if path == DEMO_CONFIG or path in GPU_ONLY else [DEMO_CONFIG, path]
    args = ["fit", *[a for c in configs for a in ("--config", str(c))], "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_instantiate_on_the_demo(path):
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(path)], run=False)
    expected = {
        "gspo": ("SequenceRatio", 3e-4),
        "gspo_token": ("SequenceTokenRatio", 3e-4),
        "grpo": ("TokenRatio", 0.2),
        "dr_grpo": ("TokenRatio", 0.2),
        "dapo": ("TokenRatio", 0.2),
    }[path.stem]
    assert type(cli.model.objective.ratio).__name__ == expected[0]
    assert cli.model.objective.clip.eps_low == expected[1]
    # linked values: given once, seen by both parts
    assert cli.model.objective.max_len == cli.datamodule.sampling.max_new_tokens
    assert cli.datamodule.tokenizer_path == cli.model.hparams.model


def test_dapo_turns_on_dynamic_sampling_and_clip_higher():
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(CONFIG_DIR / "algorithms" / "dapo.yaml")], run=False)
    assert cli.datamodule.dynamic_sampling and cli.model.objective.clip.eps_high == 0.28
    assert cli.model.objective.aggregation == "token-mean"


def test_no_config_means_the_demo():
    assert with_demo_default(["fit"]) == ["fit", "--config", str(DEMO_CONFIG)]
    assert with_demo_default(["fit", "--config", "x.yaml"]) == ["fit", "--config", "x.yaml"]


def test_unknown_component_name_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(DEMO_CONFIG), "--model.ratio", "GSPORatio"])
    err = capsys.readouterr().err
    assert "GSPORatio" in err


MISMATCH_AND_RECIPES = [p for d in ("mismatch", "recipes") for p in sorted((CONFIG_DIR / d).glob("*.yaml"))]


@pytest.mark.parametrize("path", MISMATCH_AND_RECIPES, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_mismatch_presets_and_recipes_instantiate_on_the_demo(path):
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(path)], run=False)
    correction = cli.model.pre_update.mismatch_correction
    c = correction
    got = None if c is None else (c.level, c.mode, c.threshold, c.rejection)
    expected = {
        "token_tis": ("token", "truncate", 2.0, None),
        "icepop": ("token", "mask", 5.0, None),
        "geo_rs": ("token", "none", 2.0, "geometric"),
        "token_tis_geo_rs": ("token", "truncate", 2.0, "geometric"),
        "bypass": None,
        "gspo_r3": None,
        "grpo_r3_token_tis": ("token", "truncate", 2.0, None),
        "grpo_icepop": ("token", "mask", 5.0, None),
    }[path.stem]
    assert got == expected
    assert cli.model.replay_mode == ("rollout" if "_r3" in path.stem else "off")
    if path.stem == "icepop":
        assert correction.threshold_lower == 0.5
    if "geo_rs" in path.stem:
        assert correction.rejection_bounds == pytest.approx((1 / 1.001, 1.001))
    if path.stem == "bypass":
        assert cli.model.pre_update.source == "rollout"
    if path.stem.startswith("grpo"):
        assert type(cli.model.objective.ratio).__name__ == "TokenRatio" and cli.model.objective.clip.eps_low == 0.2
