"""VLLMEngine before it builds anything, without vLLM: the missing-vLLM error (when, and what it says) and the
checks made when the data module configures the engine.

vLLM is not installed in the core environment, so the missing case runs for real here (skipped where it is).
"""

import sys
from importlib.util import find_spec

import pytest

import gspo_lightning.engines.vllm_engine as vllm_engine
from gspo_lightning.cli import DEMO_CONFIG, cli_main
from gspo_lightning.engines import SamplingConfig, VLLMEngine

vllm_missing = pytest.mark.skipif(find_spec("vllm") is not None, reason="vLLM is installed here")


@vllm_missing
def test_missing_vllm_stops_construction_with_install_and_switch_in_one_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert not vllm_engine.vllm_installed()
    with pytest.raises(ImportError) as info:
        VLLMEngine(max_model_len=1536)
    message = str(info.value)
    assert "\n" not in message
    assert 'pip install "gspo-lightning[vllm]"' in message  # how to install it
    assert "--data.engine TransformersEngine" in message and "slower rollouts" in message  # how to do without
    assert "vllm" not in sys.modules  # looked for, not imported


@vllm_missing
def test_missing_vllm_stops_the_cli_with_one_line_before_anything_is_built(monkeypatch, capsys):
    # jsonargparse would wrap the constructor's ImportError in a multi-line Union error with a traceback.
    # (Don't patch VLLMEngine.__init__ here: jsonargparse caches the signature it reads, and later tests would
    # parse VLLMEngine's options against the patch.)
    built = []
    monkeypatch.setattr("gspo_lightning.training.policy.load_policy", lambda *a, **k: built.append(a))
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(DEMO_CONFIG), "--data.engine", "VLLMEngine"], run=True)
    assert info.value.code == 2 and built == []
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: data.engine is VLLMEngine, but vLLM is not installed.")
    assert "--data.engine TransformersEngine" in err


@vllm_missing
def test_missing_vllm_stops_the_engine_while_the_cli_builds_its_classes(monkeypatch):
    # without the CLI's check (a config parsed elsewhere), the constructor still refuses before the policy loads
    loaded = []
    monkeypatch.setattr("gspo_lightning.training.policy.load_policy", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr("gspo_lightning.cli.check_engine_installed", lambda config: None)
    with pytest.raises(ValueError, match=r"vLLM is not installed.*--data\.engine TransformersEngine"):
        cli_main(["--config", str(DEMO_CONFIG), "--data.engine", "VLLMEngine"], run=False)
    assert loaded == []


def test_vllm_found_means_no_error_at_construction(monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    assert VLLMEngine(max_model_len=1536).max_model_len == 1536


@pytest.mark.parametrize(("max_model_len", "ok"), [(None, True), (5, True), (4, False), (3, False)])
def test_max_model_len_must_leave_room_for_a_prompt(monkeypatch, tiny_tokenizer, max_model_len, ok):
    monkeypatch.setattr(vllm_engine, "vllm_installed", lambda: True)
    engine = VLLMEngine(max_model_len=max_model_len)
    sampling = SamplingConfig(max_new_tokens=4)  # a 1-token prompt needs max_model_len >= 5
    if ok:
        engine.configure(sampling, tiny_tokenizer)
        assert engine.sampling is sampling
    else:
        with pytest.raises(ValueError, match=r"max_model_len=\d leaves no room.*max_prompt_length"):
            engine.configure(sampling, tiny_tokenizer)
