"""Model and tokenizer names: local folders are checked before transformers sees them; hub ids go to the hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gspo_lightning import models
from gspo_lightning.models import load_causal_lm, load_tokenizer, resolve_pretrained

HUB_ERROR = (
    "{name} is not a local folder and is not a valid model identifier listed on 'https://huggingface.co/models'\n"
    "If this is a private repository, make sure to pass a token having permission to this repo"
)


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder, with HOME there too (so ``~`` paths are under it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.fixture()
def hub_calls(monkeypatch):
    """Record what reaches ``from_pretrained`` instead of loading (no network)."""
    calls: list[str] = []

    def fake(name, *args, **kwargs):
        calls.append(str(name))
        raise OSError(HUB_ERROR.format(name=name))

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fake)
    return calls


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "name",
    ["./no_such_dir", "../no_such_dir", "no_such_dir/", "/abs/missing", "~/models/missing", "runs/a/b", "my models/x"],
)
@pytest.mark.parametrize("load", [load_causal_lm, load_tokenizer], ids=["model", "tokenizer"])
def test_a_missing_local_folder_is_one_clear_line(name, load, in_tmp, hub_calls):
    with pytest.raises(FileNotFoundError) as err:
        load(name)
    msg = _one_line(err)
    assert repr(name) in msg and "does not exist" in msg, msg
    assert "config.json" in msg and "hub id" in msg, msg  # the fix: a folder with config.json, or a hub id
    assert hub_calls == []  # refused before transformers


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "gpt2", "deepseek-ai/DeepSeek-V3.1"])
def test_hub_ids_still_go_to_the_hub(name, in_tmp, hub_calls):
    assert resolve_pretrained(name) == name
    with pytest.raises(OSError):
        load_causal_lm(name)
    assert hub_calls == [name]


def test_hub_id_whose_org_is_also_a_local_folder_still_tries_the_hub(in_tmp, hub_calls):
    (in_tmp / "Qwen" / "Qwen2.5-0.5B").mkdir(parents=True)  # a local download of another Qwen model
    assert resolve_pretrained("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    with pytest.raises(OSError) as err:  # the hub failed (here: offline): say both readings in one line
        load_causal_lm("Qwen/Qwen3-0.6B")
    msg = _one_line(err)
    assert hub_calls == ["Qwen/Qwen3-0.6B"]
    assert "'Qwen/Qwen3-0.6B' does not exist" in msg and "Qwen" in msg and "hub" in msg, msg


def test_partly_existing_path_failing_on_the_hub_names_the_missing_folder(in_tmp, hub_calls):
    (in_tmp / "outputs").mkdir()
    with pytest.raises(OSError) as err:
        load_tokenizer("outputs/final")
    msg = _one_line(err)
    assert "'outputs/final' does not exist" in msg and "config.json" in msg, msg
    assert "not a valid model identifier" in msg  # the hub's own reason, first line only


@pytest.mark.parametrize("load", [load_causal_lm, load_tokenizer], ids=["model", "tokenizer"])
def test_a_folder_without_config_json_is_one_clear_line(load, in_tmp, hub_calls):
    (in_tmp / "ckpt").mkdir()
    (in_tmp / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        load("./ckpt")
    msg = _one_line(err)
    assert "'./ckpt'" in msg and "no config.json" in msg and "save_pretrained" in msg, msg
    assert hub_calls == []


def test_a_file_instead_of_a_folder(in_tmp, hub_calls):
    (in_tmp / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError) as err:
        load_causal_lm("./config.json")
    msg = _one_line(err)
    assert "is a file" in msg and "folder" in msg, msg


def test_local_folders_load_and_tilde_is_expanded(in_tmp, tiny_path):
    home_copy = in_tmp / "home" / "tiny"
    shutil.copytree(tiny_path, home_copy)
    assert resolve_pretrained("~/tiny") == str(home_copy)
    assert load_causal_lm("~/tiny").config.model_type == "qwen3_moe"
    assert load_tokenizer("~/tiny").pad_token_id is not None


def test_a_tokenizer_only_folder_needs_no_config_json(in_tmp, tiny_path):
    tok_dir = in_tmp / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_path) / name, tok_dir / name)
    assert load_tokenizer("tok").padding_side == "left"


def test_an_empty_model_has_the_loaded_models_parameters_on_the_meta_device(tiny_path):
    # FSDP2 builds every rank's model this way before rank 0's weights fill its shards
    import torch

    from gspo_lightning.models import empty_causal_lm, load_causal_lm

    loaded, empty = load_causal_lm(tiny_path), empty_causal_lm(tiny_path)
    shapes = {name: (p.shape, p.dtype) for name, p in loaded.state_dict().items()}
    assert {name: (p.shape, p.dtype) for name, p in empty.state_dict().items()} == shapes
    assert all(p.is_meta for p in empty.parameters())
    assert empty_causal_lm(tiny_path, dtype="bfloat16").model.embed_tokens.weight.dtype == torch.bfloat16
