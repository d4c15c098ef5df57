"""What ``vllm serve`` workers need to take the trainer's weights from a folder: a vLLM worker extension.

Start servers with ``--worker-extension-cls gspo_lightning.engines.vllm_worker.WeightReloadExtension`` (the
served engine does when it starts them): vLLM adds these methods to its worker class, and the engine calls them
through the dev-mode route ``/collective_rpc``. This module runs inside the server's process, where vLLM is
importable; the trainer's side never imports it.
"""

from __future__ import annotations

from gspo_lightning.engines.vllm_weights import redo_moe_post_load


class WeightReloadExtension:
    """Methods added to each vLLM worker (``self`` is the worker)."""

    def gspo_reload_weights(self, weights_path: str) -> str:
        """Reload every weight from the safetensors files in ``weights_path`` (checkpoint names), then redo the
        fused-MoE experts' CPU pre-packing that the reload skips (``vllm_weights.redo_moe_post_load``); returns
        the number of MoE layers re-packed, as a string (what ``/collective_rpc`` returns)."""
        self.reload_weights(weights_path=weights_path)
        return str(redo_moe_post_load(self.model_runner.get_model()))
