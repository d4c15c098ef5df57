"""Prompts from datasets by name (local folders and save_to_disk through the hub's calls), chat prompts, and
reward functions receiving the rows' other columns."""

import json

import datasets
import pytest
import torch

from gspo_lightning.data import DatasetPrompts, FilePrompts, encode_prompts, prompt_texts
from gspo_lightning.engines import SamplingConfig
from gspo_lightning.models import load_tokenizer
from gspo_lightning.rewards import FunctionReward
from gspo_lightning.rollout import PolicyLink, RolloutDataModule, RolloutOptions

ROWS = {"question": ["1+2", "3+4", "5+6", "7+8"], "answer": ["3", "7", "11", "15"], "level": [1, 1, 2, 2]}
TEMPLATE = "{question}="


def test_a_save_to_disk_dataset_with_a_named_held_out_split(tmp_path):
    split = datasets.Dataset.from_dict(ROWS)
    datasets.DatasetDict({"train": split, "test": split.select([0, 1])}).save_to_disk(tmp_path / "saved")
    source = DatasetPrompts(
        str(tmp_path / "saved"), prompt_column="question", prompt_template=TEMPLATE, val_split="test"
    )
    train, held_out = source.train(), source.validation()
    assert [r.text for r in train] == ["1+2=", "3+4=", "5+6=", "7+8="] and [r.answer for r in held_out] == ["3", "7"]
    assert train[2].extras == {"level": 2} and [r.index for r in train] == [0, 1, 2, 3]


def test_a_local_dataset_folder_goes_through_load_dataset_and_a_held_out_size(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(dict(zip(ROWS, r))) + "\n" for r in zip(*ROWS.values())))
    source = DatasetPrompts(str(folder), prompt_column="question", val_size=0.5, seed=3)
    again = DatasetPrompts(str(folder), prompt_column="question", val_size=0.5, seed=3)
    assert len(source.train()) == 2 and len(source.validation()) == 2
    assert [r.text for r in source.validation()] == [r.text for r in again.validation()], "reproducible"
    with pytest.raises(ValueError, match="has no column 'prompt'"):
        DatasetPrompts(str(folder)).train()
    with pytest.raises(ValueError, match="prompt_template names column 'nope'"):
        DatasetPrompts(str(folder), prompt_column="question", prompt_template="{nope}").train()


CHAT = [
    {"prompt": [{"role": "user", "content": "1+2="}], "answer": "3"},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+4="}], "answer": "7"},
]
TEMPLATE_JINJA = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
)


@pytest.mark.parametrize("source", ["file", "dataset"])
def test_chat_messages_are_rendered_with_the_chat_template(tmp_path, tiny_path, source):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    prompts = FilePrompts(str(path)) if source == "file" else DatasetPrompts(str(tmp_path), split="train")
    records = prompts.train()
    assert records[1].messages[0] == {"role": "system", "content": "be brief"} and records[1].text == "3+4="
    tokenizer = load_tokenizer(tiny_path)
    tokenizer.chat_template = TEMPLATE_JINJA
    texts = prompt_texts(records, tokenizer, use_template=True, system_prompt="sys")
    assert texts == ["[system]sys[user]1+2=[a]", "[system]be brief[user]3+4=[a]"]
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat messages, but the tokenizer has no chat template"):
        encode_prompts(records, tokenizer, max_prompt_length=64)


SEEN: list[dict] = []


def bonus(prompts, completions, answers, level, **kwargs):
    SEEN.append({"prompts": list(prompts), "level": list(level), "other": sorted(kwargs)})
    return [0.0] * len(completions)


def test_rewards_receive_the_rows_other_columns(tmp_path, tiny_path, tiny_model):
    datasets.Dataset.from_dict(ROWS).save_to_disk(tmp_path / "saved")
    dm = RolloutDataModule(
        prompts=DatasetPrompts(str(tmp_path / "saved"), prompt_column="question", prompt_template=TEMPLATE),
        rewards=[FunctionReward(bonus)],
        tokenizer=tiny_path,
        rollout=RolloutOptions(prompts_per_step=4, num_samples=2),
        sampling=SamplingConfig(max_new_tokens=4),
    )
    dm.setup("fit")
    dm.connect(PolicyLink(tiny_model))
    torch.manual_seed(0)
    SEEN.clear()
    batch = dm.next_rollout()
    levels = {p: lv for p, lv in zip(["1+2=", "3+4=", "5+6=", "7+8="], ROWS["level"])}
    assert SEEN[0]["level"] == [levels[p] for p in SEEN[0]["prompts"]] and len(SEEN[0]["level"]) == len(batch)
    assert (
        "response_lengths" in SEEN[0]["other"] and "question" not in SEEN[0]["other"]
    )  # the prompt column is not an extra


def test_yaml_picks_the_source_by_class_name(tmp_path, capsys):
    from gspo_lightning.cli import DEMO_CONFIG, cli_main

    args = ["--data.prompts", "DatasetPrompts", "--data.prompts.path", str(tmp_path), "--data.prompts.name", "main"]
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(DEMO_CONFIG), *args, "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: gspo_lightning.data.DatasetPrompts" in printed and "name: main" in printed
