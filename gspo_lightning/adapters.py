"""Parameter-efficient fine-tuning through ``peft``: adapters on the policy, the reference as the policy with its
adapters off, and the merged weights a rollout engine with its own copy of the model needs.

LoRA (Hu et al., arXiv 2106.09685) trains ``W' = W + s · B A`` with ``A`` (r, in), ``B`` (out, r) and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), ``W`` frozen. Only the adapters are optimised,
so optimiser state and gradients shrink to the adapters' size; with ``kl_coef > 0`` the reference pi_ref is
the same model with the adapters switched off, so no second copy of the weights is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER_INIT_SEED = 0


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a ``peft`` model (``PeftModel``)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` under a ``peft`` wrapper (``model`` itself otherwise): what holds
    ``generation_config``, ``save_pretrained`` of full weights and the config."""
    return model.get_base_model() if is_peft(model) else model


def apply_peft(policy: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model(policy, config)``: the base weights frozen, the adapters trainable, initialised
    from :data:`ADAPTER_INIT_SEED` (the global RNG is left as it was).

    Raises:
        ValueError: ``config`` is not a ``peft.PeftConfig``, or it leaves nothing to train.
    """
    import peft

    if not isinstance(config, peft.PeftConfig):
        raise ValueError(
            f"model.peft must be a peft config (e.g. class_path: peft.LoraConfig), got {type(config).__name__}."
        )
    with torch.random.fork_rng(devices=[]):  # every rank (and a rerun) starts from the same adapters, whatever
        torch.manual_seed(ADAPTER_INIT_SEED)  # its RNG state: FSDP2 does not broadcast parameters as DDP does
        model = peft.get_peft_model(policy, config)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model.peft ({type(config).__name__}) left no trainable parameter: check target_modules.")
    return model


class AdapterDisabled(nn.Module):
    """The policy with its adapters switched off, as the frozen reference pi_ref (no second copy of the weights).

    Forwards run inside ``peft``'s ``disable_adapter()``; the output projection and config are the policy's.
    Kept out of the module's parameters by the caller (it holds the policy itself).
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy

    @property
    def config(self):
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.policy.set_output_embeddings(head)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def _full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """LoRA layers of a ``peft`` model by module name (their ``base_layer`` holds the frozen weight)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _delta(layer: nn.Module, owner: str, state: dict[str, Tensor]) -> Tensor | None:
    """``sum over active adapters of s · B A`` (transposed for ``fan_in_fan_out`` layers), with ``A`` and ``B``
    read from ``state`` (gathered there, so every rank gathers the same entries in the same order), or None when
    no active adapter of the layer is a plain linear LoRA (then nothing is merged here)."""
    total = None
    for name in layer.active_adapters:
        if name not in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_magnitude_vector", {}):
            continue
        a = _full(state[f"{owner}.lora_A.{name}.weight"]).float()
        b = _full(state[f"{owner}.lora_B.{name}.weight"]).float()
        delta = (b @ a) * layer.scaling[name]
        delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
        total = delta if total is None else total + delta
    return total


def hf_name(name: str) -> str | None:
    """A ``peft`` state-dict name as the transformers checkpoint spells it, or None for adapter-only entries:
    ``base_model.model.`` and every ``.base_layer`` dropped, ``modules_to_save`` copies in place of the originals."""
    if ".lora_" in name or ".original_module." in name or name.endswith("lora_magnitude_vector"):
        return None
    name = re.sub(r"(\.base_layer)+\.", ".", name.removeprefix("base_model.model."))
    return name.replace(".modules_to_save.default.", ".")


def _parameter_adapters(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """LoRA on parameters (peft's ``ParamWrapper``, e.g. fused MoE experts), by the state-dict name of the
    parameter they adapt: the innermost ``base_layer``'s ``parameter_name``."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, layer in layers.items():
        if getattr(layer, "parameter_name", None):
            inner, module = name, layer
            while isinstance(module, LoraLayer):
                inner, module = f"{inner}.base_layer", module.base_layer
            found[f"{inner}.{layer.parameter_name}"] = layer
    return found


def _parameter_delta(layer: nn.Module) -> Tensor:
    """peft's own ``get_delta_weight`` of a parameter adapter, summed over its active adapters (unsharded only)."""
    if any(hasattr(p, "full_tensor") for p in layer.parameters()):
        raise ValueError(
            "LoRA on fused MoE expert parameters cannot be merged from sharded (FSDP2) weights: target the"
            " attention / linear layers only (e.g. target_modules: [q_proj, k_proj, v_proj, o_proj]), or use DDP."
        )
    return sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)


def merged_weights(policy: nn.Module, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """(transformers name, full tensor) of the policy with its LoRA adapters merged: ``W + s · B A``.

    ``state`` is the policy's state dict (entries may be DTensor shards: each is gathered when reached, so
    every rank must run this to the end, in order). The policy itself is never modified (no merge/unmerge
    round trip on its weights, which would be lossy in bfloat16).

    Raises:
        ValueError: an adapter kind whose merge is not a plain ``B A`` product (DoRA, conv, embedding LoRA).
    """
    layers = _lora_layers(policy)
    parameters = _parameter_adapters(layers)
    for name, tensor in state.items():
        out = hf_name(name)
        if out is None:
            continue
        tensor = _full(tensor).detach()
        owner = name.removesuffix(".base_layer.weight")
        delta = None
        if name in parameters:
            delta = _parameter_delta(parameters[name])
        elif owner != name and owner in layers:
            delta = _delta(layers[owner], owner, state)
            if delta is None and any(True for _ in layers[owner].active_adapters):
                raise ValueError(
                    f"{owner}: only plain linear LoRA adapters are merged into the rollout engine's weights (not"
                    " DoRA, conv or embedding LoRA): use a LoraConfig on linear layers, or TransformersEngine."
                )
        if delta is not None:
            tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
        yield out, tensor


def trainable(parameters: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters the optimiser updates (frozen base weights of a ``peft`` model are left out)."""
    return [p for p in parameters if p.requires_grad]
