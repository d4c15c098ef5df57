"""Every shipped YAML parses through the real CLI parser; CPU-runnable ones also instantiate."""

import re
from pathlib import Path

import pytest
import yaml

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


PRESET_PARTS = {  # ratio, clip, token masks, aggregation, the clip's defining parameters
    "gspo": ("SequenceRatio", "PPOClip", [], "seq-mean-token-mean", {"eps_low": 3e-4, "eps_high": 4e-4}),
    "gspo_token": ("SequenceTokenRatio", "PPOClip", [], "seq-mean-token-mean", {"eps_low": 3e-4}),
    "grpo": ("TokenRatio", "PPOClip", [], "seq-mean-token-mean", {"eps_low": 0.2, "eps_high": 0.2}),
    "dr_grpo": ("TokenRatio", "PPOClip", [], "seq-mean-token-sum-norm", {"eps_low": 0.2}),
    "dapo": ("TokenRatio", "PPOClip", [], "token-mean", {"eps_low": 0.2, "eps_high": 0.28}),
    "sapo": ("TokenRatio", "SAPOGate", [], "seq-mean-token-mean", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "cispo": ("TokenRatio", "CISPOClip", [], "token-mean", {"eps_low": 1.0, "eps_high": 4.0}),
    "gmpo": ("TokenRatio", "GMPOClip", [], "seq-mean-token-mean", {"eps_low": 0.4, "eps_high": 0.4}),
    "dppo_tv": ("TokenRatio", "NoClip", ["DivergenceMask"], "token-mean", {}),
    "dppo_kl": ("TokenRatio", "NoClip", ["DivergenceMask"], "token-mean", {}),
    "clip_cov": ("TokenRatio", "PPOClip", ["ClipCov"], "token-mean", {"eps_low": 1.0, "eps_high": 1.0}),
    "kl_cov": ("TokenRatio", "NoClip", ["KLCov"], "token-mean", {}),
    # overlays: the demo's GSPO with a mask
    "opsm": ("SequenceRatio", "PPOClip", ["OffPolicySequenceMask"], "seq-mean-token-mean", {"eps_low": 3e-4}),
    "forking_tokens": ("SequenceRatio", "PPOClip", ["HighEntropyTokens"], "seq-mean-token-mean", {"eps_low": 3e-4}),
}


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_instantiate_on_the_demo(path):
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(path)], run=False)
    ratio, clip, masks, aggregation, params = PRESET_PARTS[path.stem]
    objective = cli.model.objective
    assert (type(objective.ratio).__name__, type(objective.clip).__name__) == (ratio, clip)
    assert all(getattr(objective.clip, k) == v for k, v in params.items()), objective.clip
    built = [type(m).__name__ for m in [*objective.masks, *cli.model.pre_update.masks]]
    assert built == masks and objective.aggregation == aggregation
    # linked values: given once, seen by both parts
    assert objective.max_len == cli.datamodule.sampling.max_new_tokens
    assert cli.datamodule.tokenizer_path == cli.model.options.policy.path


def test_dppo_anchors_its_trust_region_to_the_engine():
    cli = cli_main(
        ["--config", str(DEMO_CONFIG), "--config", str(CONFIG_DIR / "algorithms" / "dppo_tv.yaml")], run=False
    )
    (mask,) = cli.model.objective.masks
    assert (mask.divergence, mask.delta_low, mask.delta_high) == ("tv", 0.15, 0.15)
    assert cli.model.pre_update.source == "rollout"


def test_dapo_turns_on_dynamic_sampling_and_clip_higher():
    cli = cli_main(["--config", str(DEMO_CONFIG), "--config", str(CONFIG_DIR / "algorithms" / "dapo.yaml")], run=False)
    assert cli.datamodule.rollout.dynamic_sampling and cli.model.objective.clip.eps_high == 0.28
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
    assert cli.model.options.moe.replay == ("rollout" if "_r3" in path.stem else "off")
    if path.stem == "icepop":
        assert correction.threshold_lower == 0.5
    if "geo_rs" in path.stem:
        assert correction.rejection_bounds == pytest.approx((1 / 1.001, 1.001))
    if path.stem == "bypass":
        assert cli.model.pre_update.source == "rollout"
    if path.stem.startswith("grpo"):
        assert type(cli.model.objective.ratio).__name__ == "TokenRatio" and cli.model.objective.clip.eps_low == 0.2


def header(path: Path) -> list[str]:
    """The comment lines a config opens with."""
    lines = path.read_text().splitlines()
    return lines[: next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_every_config_states_the_hardware_it_was_sized_for(path):
    sized = [line for line in header(path) if line.startswith("# Sized for: ")]
    assert len(sized) == 1 and len(sized[0]) > len("# Sized for: ") + 10, f"{path.name}: add a '# Sized for: ' line"


VLLM_CONFIGS = [p for p in GPU_ONLY if "VLLMEngine" in p.read_text()]


def test_gpu_configs_generate_with_vllm():
    names = {p.name for p in VLLM_CONFIGS}
    assert names == {p.name for p in GPU_ONLY} and {"qwen3_0.6b_math.yaml", "qwen3_30b_a3b.yaml"} <= names


@pytest.mark.parametrize("path", VLLM_CONFIGS, ids=lambda p: p.stem)
def test_vllm_sizing_is_consistent(path):
    config = yaml.safe_load(path.read_text())
    trainer, data = config["trainer"], config["data"]
    engine = data["engine"]["init_args"]
    # the engine plans for the longest prompt plus the longest response, no less (no more: KV cache is sized by it)
    assert engine["max_model_len"] == data["encoding"]["max_prompt_length"] + data["sampling"]["max_new_tokens"]
    # a tensor-parallel engine is made of training ranks (external_launcher): its size divides the world size
    assert (trainer["devices"] * trainer.get("num_nodes", 1)) % engine["tensor_parallel_size"] == 0
    assert engine["dtype"] == "bfloat16"  # not "policy": the trainer keeps float32 master weights
    assert 0 < engine["gpu_memory_utilization"] < 1 and engine["max_num_seqs"] > 0
    assert f"gpu_memory_utilization {engine['gpu_memory_utilization']}" in path.read_text()  # the header's arithmetic


@pytest.mark.parametrize("path", VLLM_CONFIGS, ids=lambda p: p.stem)
def test_header_says_how_to_run_without_vllm(path, capsys):
    (flags,) = [f for line in header(path) for f in re.findall(r"`(--data\.engine TransformersEngine[^`]*)`", line)]
    cli_args = ["fit", "--config", str(path), *flags.split(), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(cli_args)
    assert exit_info.value.code in (0, None)
    engine = yaml.safe_load(capsys.readouterr().out)["data"]["engine"]
    assert engine["class_path"].endswith("TransformersEngine")
    assert engine["init_args"]["batch_size"] > 0  # bounded: all prompts at once would not fit beside the trainer
