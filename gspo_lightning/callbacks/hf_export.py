"""`HFExport`: write the policy and tokenizer as a Hugging Face folder that ``from_pretrained`` loads.

The callback only reads the trained model: its full weights come from :mod:`gspo_lightning.sharding`, whatever
shards them (FSDP1, FSDP2, DeepSpeed ZeRO-3), and LoRA adapters are merged by :mod:`gspo_lightning.adapters`;
it imports nothing of the training loop.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel
from typing_extensions import override

from gspo_lightning.adapters import is_peft, merged_weights, transformers_model
from gspo_lightning.sharding import full_child_state_dict


class HFExport(Callback):
    """Saves ``save_pretrained`` folders for serving with vLLM or transformers.

    Exports the transformers model the LightningModule holds as a child (GSPOModule's ``policy``), gathered
    from whatever shards it, and the data module's tokenizer. A ``peft`` policy (LoRA) is written as its adapter
    (``adapter_config.json`` + adapter weights, loaded with ``peft.PeftModel.from_pretrained`` on the base
    model) and, with ``merge_adapters``, also as a full model with the adapters merged in ``<name>/merged``.

    ``gspo-lightning fit`` adds one with the defaults unless the configuration has an HFExport: every run ends
    with ``<log_dir>/hf_export/final``, named in one line. Opt out with an HFExport that writes no final folder:
    ``--trainer.callbacks+=HFExport --trainer.callbacks.final=false``.

    Args:
        dirpath: output folder (default: ``<log_dir>/hf_export``); each export goes to ``step_<global_step>``
            and the final one to ``final``.
        every_n_steps: export every this many rollout batches as well (None: only at the end).
        safe_serialization: write safetensors.
        merge_adapters: for a ``peft`` policy, also write the merged full model (``W + s B A``).
        final: write ``final`` when training ends (a run stopped by SIGTERM or an error writes none).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_steps: int | None = None,
        safe_serialization: bool = True,
        merge_adapters: bool = False,
        final: bool = True,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}.")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.safe_serialization = safe_serialization
        self.merge_adapters = merge_adapters
        self.final = final
        self._calls = 0

    def _root(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_export"

    @staticmethod
    def pretrained_child(pl_module: pl.LightningModule) -> tuple[str, PreTrainedModel]:
        """The transformers model the LightningModule trains: its one ``PreTrainedModel`` child.

        Raises:
            RuntimeError: it has none (or several).
        """
        found = [(n, m) for n, m in pl_module.named_children() if isinstance(m, PreTrainedModel) or is_peft(m)]
        if len(found) != 1:
            raise RuntimeError(
                f"HFExport exports the one transformers model a LightningModule holds as a child (as GSPOModule's"
                f" policy); {type(pl_module).__name__} has {len(found)}. Remove the callback or keep one."
            )
        return found[0]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pretrained_child(pl_module)  # fail at the start, not after training

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> Path:
        """Write the folder ``<root>/<name>`` (rank 0 writes; every rank must call it)."""
        path = self._root(trainer) / name
        child, model = self.pretrained_child(pl_module)
        # a collective under sharded strategies (every rank gathers the shards), a plain copy otherwise
        state_dict = full_child_state_dict(trainer.model, child, model)
        if trainer.is_global_zero:
            path.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(path, state_dict=state_dict, safe_serialization=self.safe_serialization)
            trainer.datamodule.tokenizer.save_pretrained(path)
            if is_peft(model) and self.merge_adapters:
                merged = dict(merged_weights(model, state_dict))
                base = transformers_model(model)
                base.save_pretrained(path / "merged", state_dict=merged, safe_serialization=self.safe_serialization)
                trainer.datamodule.tokenizer.save_pretrained(path / "merged")
            rank_zero_info(self._written(path, model, name == "final"))
        trainer.strategy.barrier("hf_export")
        return path

    def _written(self, path: Path, model: PreTrainedModel, final: bool) -> str:
        """The line saying what was written where, and how to load it."""
        if not final:
            return f"HFExport: wrote {path}"
        if not is_peft(model):
            return f"Final policy saved as a Hugging Face folder: {path} (AutoModelForCausalLM.from_pretrained)"
        merged = f"; merged into the full model: {path / 'merged'}" if self.merge_adapters else ""
        return (
            f"Final LoRA adapters saved as a peft folder: {path} (peft.PeftModel.from_pretrained on the base"
            f" model){merged}"
        )

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._calls += 1
        if self.every_n_steps is not None and self._calls % self.every_n_steps == 0:
            self.export(trainer, pl_module, f"step_{trainer.global_step}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.final:
            self.export(trainer, pl_module, "final")
