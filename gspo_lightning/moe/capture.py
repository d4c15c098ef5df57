"""The experts a transformers MoE model routes every position to while it generates (the engine's routes).

Rollout Routing Replay (R3, arXiv 2510.11370) replays, in the trainer, the experts the rollout engine chose.
:class:`GenerationRoutes` records them during ``generate``: a forward pre-hook on the model reads which
columns of the sequence each forward runs (the prefill runs the prompt, each decode step one new column;
without a KV cache every step re-runs all columns) and forward hooks on the top-k routers keep the experts
chosen there. The result is laid out like the trainer's input: (n, L, S, k) for the n rows of ``generate``'s
output and its S columns, with a mask of the columns some forward ran.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from gspo_lightning.moe.routing import find_routers


def routes_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer type that holds expert ids: uint8 up to 256 experts, else int16."""
    return torch.uint8 if num_experts <= 256 else torch.int16


class GenerationRoutes:
    """Records the top-k experts of every router at every column the model runs while generating.

    Use :meth:`capture` around one ``generate`` call, then :meth:`result` with the returned sequences' width.

    Raises:
        ValueError: the model has no top-k router (``moe.routing.find_routers``).
    """

    def __init__(self, model: nn.Module, num_experts: int) -> None:
        self.model = model
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no top-k router: it reports no MoE routes.")
        self.dtype = routes_dtype(num_experts)
        self._steps: list[tuple[int, int, list[Tensor | None]]] = []  # (first column, width, experts per layer)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        rows, width = ids.shape[0], ids.shape[1]
        # older transformers pass the KV cache as `past_key_values`, 5.x as `cache`; recent ones drop the
        # attention mask when no row is padded
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        mask = kwargs.get("attention_mask")
        seen = cache.get_seq_length() if cache is not None else 0
        end = mask.shape[-1] if mask is not None else seen + width  # generate's mask spans every column so far
        self._steps.append((end - width, width, [None] * len(self.routers)))
        self._rows = rows

    def _router_hook(self, layer: int):
        def hook(module: nn.Module, inputs, output) -> None:
            if self._steps:
                _, width, experts = self._steps[-1]
                experts[layer] = output[2].detach().reshape(self._rows, width, -1).to("cpu", self.dtype)

        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the routes of the forwards run inside the context."""
        self._steps = []
        handles = [self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)]
        handles += [r.register_forward_hook(self._router_hook(i)) for i, r in enumerate(self.routers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def result(self, width: int) -> tuple[Tensor, Tensor]:
        """(n, L, width, k) experts and the (n, width) bool mask of the columns a forward ran.

        A later forward over a column overwrites an earlier one (without a KV cache the last step re-runs
        them all); columns past ``width`` (forwards of ranks still stepping under ``synced_gpus``) are dropped.
        """
        done = [(start, w, e) for start, w, e in self._steps if all(x is not None for x in e)]
        if not done:
            raise RuntimeError("No MoE routes were captured: run generate inside capture().")
        rows, k = done[0][2][0].shape[0], done[0][2][0].shape[-1]
        routes = torch.zeros(rows, len(self.routers), width, k, dtype=self.dtype)
        ran = torch.zeros(rows, width, dtype=torch.bool)
        for start, w, experts in done:
            stop = min(start + w, width)
            if stop <= start:
                continue
            routes[:, :, start:stop] = torch.stack(experts, dim=1)[:, :, : stop - start]
            ran[:, start:stop] = True
        return routes, ran
