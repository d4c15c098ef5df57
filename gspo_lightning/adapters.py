"""Parameter-efficient fine-tuning through ``peft``: adapters on the policy, the reference as the policy with its
adapters off, and the merged weights a rollout engine with its own copy of the model needs.

LoRA (Hu et al., arXiv 2106.09685) trains ``W' = W + s · B A`` with ``A`` (r, in), ``B`` (out, r) and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), ``W`` frozen. Only the adapters are optimised,
so optimiser state and gradients shrink to the adapters' size; with ``kl_coef > 0`` the reference pi_ref is
the same model with the adapters switched off, so no second copy of the weights is loaded.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from gspo_lightning.moe import find_routers

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
    from :data:`ADAPTER_INIT_SEED` (the global RNG is left as it was). ``config`` itself is not modified (peft
    resolves ``all-linear`` in a copy).

    ``target_modules: all-linear`` leaves the MoE routers (:func:`~gspo_lightning.moe.find_routers`) as they are,
    for routing stability: peft would adapt them (on transformers 5 as the parameter ``mlp.gate.weight``).
    Naming them adapts them: ``target_modules: [..., gate]``, or ``target_parameters: [mlp.gate.weight]``.

    Raises:
        ValueError: ``config`` is not a ``peft.PeftConfig``, it leaves nothing to train, or it adapts the output
            layer of a model with tied embeddings (:func:`_refuse_adapted_tied_head`).
    """
    import peft

    if not isinstance(config, peft.PeftConfig):
        raise ValueError(
            f"model.peft must be a peft config (e.g. class_path: peft.LoraConfig), got {type(config).__name__}."
        )
    config = copy.deepcopy(config)  # peft rewrites the config it is given (all-linear resolved to names)
    routers = _routers_left_alone(policy, config)
    parameter_names = [name for name, _ in policy.named_parameters()]
    if routers:  # routers that are nn.Linear: peft's own exclusion (it does not apply to target_parameters)
        config.exclude_modules = _excluding(config.exclude_modules, list(routers))
    with torch.random.fork_rng(devices=[]):  # every rank (and a rerun) starts from the same adapters, whatever
        torch.manual_seed(ADAPTER_INIT_SEED)  # its RNG state: FSDP2 does not broadcast parameters as DDP does
        model = peft.get_peft_model(policy, config)
    _unwrap_routers(model, routers, parameter_names)
    _refuse_adapted_tied_head(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"model.peft ({type(config).__name__}) left no trainable parameter: check target_modules.")
    return model


def _routers_left_alone(policy: nn.Module, config: Any) -> dict[str, nn.Module]:
    """The routers of ``policy`` by module name that ``config`` reaches through ``all-linear`` only (none for any
    other ``target_modules``, a list or a regex, which adapt what they name; none whose weight
    ``target_parameters`` names)."""
    target = getattr(config, "target_modules", None)
    if not (isinstance(target, str) and target.lower() == "all-linear"):
        return {}
    found = find_routers(policy)
    named = {name: module for name, module in policy.named_modules() if any(module is r for r in found)}
    explicit = list(getattr(config, "target_parameters", None) or [])
    return {
        name: router
        for name, router in named.items()
        if not any(_names(t, f"{name}.{p}") for t in explicit for p, _ in router.named_parameters(recurse=False))
    }


def _names(target: str, key: str) -> bool:
    """Whether a peft ``target_parameters`` entry matches the parameter ``key`` (peft's rule: equal, or a suffix)."""
    return key == target or key.endswith(f".{target}")


def _excluding(exclude: Any, names: list[str]) -> Any:
    """peft's ``exclude_modules`` (None, a list, or a regex) with the module ``names`` added."""
    if isinstance(exclude, str):
        return "|".join([f"(?:{exclude})", *map(re.escape, names)])
    return sorted({*(exclude or ()), *names})


def _unwrap_routers(model: nn.Module, routers: dict[str, nn.Module], parameter_names: list[str]) -> None:
    """Put the ``routers`` back in place of the peft wrappers around them (``target_parameters`` adapters, which
    ``exclude_modules`` does not stop), and drop the ``target_parameters`` entries that reach nothing but routers
    from the adapter config that ``save_pretrained`` writes (so a saved adapter loads without router adapters).
    ``parameter_names``: the policy's before peft."""
    if not routers:
        return
    base, tuner = model.get_base_model(), model.base_model
    for name, router in routers.items():
        if base.get_submodule(name) is not router:
            base.set_submodule(name, router)
    keys = {f"{name}.{p}" for name, router in routers.items() for p, _ in router.named_parameters(recurse=False)}
    if isinstance(getattr(tuner, "targeted_parameter_names", None), list):
        tuner.targeted_parameter_names[:] = [k for k in tuner.targeted_parameter_names if k not in keys]
    for config in model.peft_config.values():
        targets = set(getattr(config, "target_parameters", None) or ())
        reached = {t: {k for k in parameter_names if _names(t, k)} for t in targets}
        if targets:
            config.target_parameters = {t for t in targets if not reached[t] or not reached[t] <= keys}


def _peft_wrappers() -> tuple[type, ...]:
    """peft's module wrappers: adapter layers (LoRA, ``ParamWrapper``) and ``modules_to_save`` copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The module under peft's wrappers (``module`` itself when it is not wrapped)."""
    tuner, auxiliary = _peft_wrappers()
    while isinstance(module, (tuner, auxiliary)):
        module = module.base_layer if isinstance(module, tuner) else module.original_module
    return module


def _refuse_adapted_tied_head(model: nn.Module) -> None:
    """Raise when ``model`` (peft) adapts the output layer (LoRA or ``modules_to_save``) of a model whose input
    and output embeddings are tied: vLLM's weight loader skips ``lm_head.weight`` for tied models and a merged
    export ties the head back to the embedding, so the adapter would never reach either."""
    hf = model.get_base_model()
    head = hf.get_output_embeddings()
    base, embedding = _unwrapped(head), _unwrapped(hf.get_input_embeddings())
    if base is head:
        return
    shared = getattr(base, "weight", None) is not None and base.weight is getattr(embedding, "weight", None)
    if shared or getattr(hf.config, "tie_word_embeddings", False):
        name = next(n for n, m in hf.named_modules() if m is head)
        raise ValueError(
            f"model.peft adapts {name}, the output layer of a model with tied embeddings (tie_word_embeddings): vLLM"
            " and a merged export tie it back to the input embedding and would lose the adapter; drop"
            f" {name} from target_modules / modules_to_save, or untie the embeddings in a copy of the checkpoint."
        )


class AdapterDisabled(nn.Module):
    """The policy with its adapters switched off, as the frozen reference pi_ref (no second copy of the weights).

    Forwards run inside ``peft``'s ``disable_adapter()``, which switches off the adapters it finds in the module
    tree; a :class:`~gspo_lightning.training.logprobs.ChunkedLogprobHead` standing in for the output projection
    keeps the real one (its ``stands_in_for``) outside that tree, so its adapters (LoRA on ``lm_head``, a
    ``modules_to_save`` copy) are switched off here too. The output projection and config are the policy's. Kept
    out of the module's parameters by the caller (it holds the policy itself). No gradient goes through it: the
    chunked head's recomputation in backward would run with the adapters back on.
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
        head = self.policy.get_output_embeddings()
        outside = getattr(head, "stands_in_for", None)  # the real projection behind a ChunkedLogprobHead
        with self.policy.disable_adapter(), _adapters_off(outside):
            return self.policy(*args, **kwargs)


@contextmanager
def _adapters_off(module: nn.Module | None) -> Iterator[None]:
    """peft's adapters in ``module`` (None: none) switched off inside the block, as ``disable_adapter()`` does for
    the module tree (``enable_adapters(False)``, which also stops their gradients), and back on after."""
    layers = [m for m in module.modules() if isinstance(m, _peft_wrappers())] if module is not None else []
    layers = [m for m in layers if not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


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


def _bias_delta(layer: nn.Module, owner: str, state: dict[str, Tensor]) -> Tensor | None:
    """``sum over active adapters with lora_bias of s · b_B``, ``b_B`` the bias of ``lora_B`` (read from ``state``
    as in :func:`_delta`): what peft's ``merge()`` adds to the base layer's bias (``lora_bias=True``), or None."""
    total = None
    for name in layer.active_adapters:
        if not getattr(layer, "lora_bias", {}).get(name) or name in getattr(layer, "lora_magnitude_vector", {}):
            continue
        delta = _full(state[f"{owner}.lora_B.{name}.bias"]).float() * layer.scaling[name]
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
    """(transformers name, full tensor) of the policy with its LoRA adapters merged: ``W + s · B A``, and with
    ``lora_bias=True`` the bias ``b + s · b_B`` (as peft's ``merge_and_unload()``).

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
        elif name.endswith(".base_layer.bias") and name.removesuffix(".base_layer.bias") in layers:
            owner = name.removesuffix(".base_layer.bias")
            delta = _bias_delta(layers[owner], owner, state)
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


def base_weights(policy: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(transformers name, full tensor) of a peft policy's frozen base, its adapters left out (a served engine
    starts from them and loads the adapters on top)."""
    for name, tensor in policy.state_dict().items():
        out = hf_name(name)
        if out is not None:
            yield out, _full(tensor).detach()


def trainable(parameters: Iterator[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters the optimiser updates (frozen base weights of a ``peft`` model are left out)."""
    return [p for p in parameters if p.requires_grad]
