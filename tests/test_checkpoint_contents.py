"""What checkpoint files hold and how they are written: LoRA checkpoints carry the adapters only (resume still
exact, other adapters refused), and a full disk during a save is one line with no partial file left."""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT, tiny_args
from test_resume import _last, _record

from gspo_lightning.checkpoints import AtomicCheckpointIO
from gspo_lightning.cli import cli_main


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch):
    """No pytest arguments in sys.argv for LightningCLI to warn about next to ``args``."""
    monkeypatch.setattr(sys, "argv", ["gspo-lightning"])


# -- issue 22, 20: a full disk during a save -----------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch, code, where):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    full = OSError(code, os.strerror(code))

    def write_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise full

    def fail(*args):
        raise full

    if where == "write":
        monkeypatch.setattr(torch, "save", write_then_fail)
    else:
        monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as error:
        io.save_checkpoint({"global_step": 2}, path)
    message = str(error.value)
    assert error.value.errno == code and "\n" not in message
    assert str(tmp_path) in message and ("full" in message if code == errno.ENOSPC else "quota" in message)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the partial file is removed at once"
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1, "the previous checkpoint is intact"


# -- issue 22, 22a: LoRA checkpoints hold the adapters, not the frozen base -----------------------------------
LORA = (
    "--config",
    str(ROOT / "configs" / "lora.yaml"),
    "--model.peft.init_args.r",
    "2",  # adapters a small part of the tiny model, as of a real one
    "--data.rewards",  # the untrained adapters never answer right: reward odd digits, for non-zero updates
    '[{"class_path": "RegexFormatReward", "init_args": {"pattern": "[13579]"}}]',
)


@pytest.fixture(scope="module")
def lora_trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The root and rollouts of one LoRA rollout batch (2 optimizer steps) of the tiny CLI run."""
    root = tmp_path_factory.mktemp("lora_trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["gspo-lightning"])
        rollouts, _ = _record(root, *LORA, max_steps=2)
    return root, rollouts


def test_a_lora_checkpoint_holds_the_adapters_and_resume_last_continues_exactly(lora_trained, tmp_path):
    straight, straight_cli = _record(tmp_path / "straight", *LORA, max_steps=6)
    root = tmp_path / "killed"
    shutil.copytree(lora_trained[0], root)
    assert lora_trained[1] == straight[:1]
    module = straight_cli.model
    frozen = {n: p for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert frozen and all(".lora_" in n for n in adapters)
    saved = torch.load(_last(root), weights_only=True)
    assert set(saved["state_dict"]) == set(adapters), "the adapters only, no base weight"
    assert len(saved["optimizer_states"][0]["state"]) == len(adapters)
    base_bytes = sum(p.numel() * p.element_size() for p in frozen.values())
    assert _last(root).stat().st_size < base_bytes / 2, "adapters and their optimizer state: a fraction of the base"
    # killed after its first rollout batch, resumed with `--ckpt_path last`: what the uninterrupted run did
    resumed, resumed_cli = _record(root, *LORA, "--ckpt_path", "last", max_steps=6)
    assert resumed_cli.trainer.ckpt_path == str(_last(root))
    assert [b["step"] for b in resumed] == [4, 6]
    assert resumed == straight[1:], "same prompts, samples and rewards"
    final = resumed_cli.model.state_dict()  # the frozen base from model.policy.path, the adapters trained on
    assert any(not torch.equal(saved["state_dict"][n], final[n]) for n in adapters), "the adapters trained on"
    for name, value in module.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)
    ends = torch.load(_last(tmp_path / "straight"), weights_only=True), torch.load(_last(root, 1), weights_only=True)
    assert set(ends[1]["state_dict"]) == set(adapters)
    states = [end["optimizer_states"][0]["state"] for end in ends]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states[1][key][field], states[0][key][field], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "configured"),
    [
        (("--model.peft.init_args.r", "4"), "r=4"),
        (("--model.peft.init_args.target_modules", "[q_proj, v_proj]"), "target_modules=['q_proj', 'v_proj']"),
        (("--model.peft", "null"), "no model.peft"),
    ],
    ids=["rank", "targets", "no-peft"],
)
def test_resuming_lora_adapters_with_another_peft_config_is_refused_in_one_line(
    lora_trained, tmp_path, change, configured
):
    checkpoint = _last(lora_trained[0])
    with pytest.raises(ValueError, match="adapters") as error:
        cli_main(["fit", *tiny_args(tmp_path, *LORA, *change, max_steps=4), "--ckpt_path", str(checkpoint)])
    message = str(error.value)
    assert "\n" not in message and str(checkpoint) in message
    assert "LoraConfig(r=2, target_modules='all-linear', lora_alpha=32)" in message, "the checkpoint's config"
    assert configured in message, "the configured one"
