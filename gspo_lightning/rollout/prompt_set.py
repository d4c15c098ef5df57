"""Encoding a data module's prompt splits: overlong prompts dropped with a count (or refused), the training set
checked against the ranks and the rollout batch size."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.utilities import rank_zero_warn

from gspo_lightning.data.encode import EncodedPrompt, encode_prompts

if TYPE_CHECKING:
    from gspo_lightning.rollout.datamodule import RolloutDataModule


def encode_split(dm: RolloutDataModule, records: list, split: str) -> list[EncodedPrompt]:
    """Tokenise ``records``, warning with a count when overlong ones are dropped."""
    if not records:
        return []
    encoded, dropped = encode_prompts(
        records,
        tokenizer=dm.tokenizer,
        max_prompt_length=dm.encoding.max_prompt_length,
        on_overlong=dm.encoding.on_overlong,
        chat_template=dm.encoding.chat_template,
        system_prompt=dm.encoding.system_prompt,
        tools=dm.tool_schemas or None,
    )
    if dropped:
        rank_zero_warn(
            f"Dropped {dropped} {split} prompts longer than data.encoding.max_prompt_length="
            f"{dm.encoding.max_prompt_length} tokens ({len(encoded)} kept). Raise it to keep them, or set"
            " data.encoding.on_overlong=error."
        )
    return encoded


def encode_train(dm: RolloutDataModule, world: int) -> list[EncodedPrompt]:
    """The encoded training prompts; refused when the ranks cannot all get one, warned when a batch repeats."""
    train = encode_split(dm, dm.source.train(), "training")
    if len(train) < world:
        raise ValueError(f"Only {len(train)} training prompts for {world} ranks.")
    per_step = dm.rollout.prompts_per_step
    if len(train) // world < per_step // world:
        rank_zero_warn(
            f"Only {len(train)} training prompts for data.rollout.prompts_per_step={per_step}: every rollout"
            " batch repeats prompts. Add prompts or lower data.rollout.prompts_per_step."
        )
    return train
