"""The numbers of a model that set its memory, read without loading any weight.

Where a model's ``config.json`` comes from, in order: a local folder, the Hugging Face cache
(``local_files_only``: no network), the numbers this project carries for the models its configs name (the
public ``config.json`` values of Qwen/Qwen3-0.6B and Qwen/Qwen3-30B-A3B), and for ``builtin:<name>`` the demo
model's :class:`~gspo_lightning.demo.model.DemoSpec` (the model is not built). Parameter counts are exact: the
model is built from its config on the meta device (no memory), so any transformers architecture is counted as
transformers builds it, LoRA adapters included (``peft`` on the meta model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gspo_lightning.adapters import apply_peft
from gspo_lightning.demo.model import BUILTINS, DemoSpec
from gspo_lightning.demo.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS
from gspo_lightning.models import BUILTIN_PREFIX
from gspo_lightning.sharding import decoder_layers

_QWEN3_COMMON = {
    "vocab_size": 151_936, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000,
    "attention_bias": False, "bos_token_id": 151_643, "eos_token_id": 151_645, "max_position_embeddings": 40_960,
}  # fmt: skip
CARRIED_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3", **_QWEN3_COMMON, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True,
        "dtype": "bfloat16",
    },
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", **_QWEN3_COMMON, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "tie_word_embeddings": False, "dtype": "bfloat16",
    },
}  # fmt: skip
"""The public ``config.json`` values of the models the shipped configs name, so ``plan`` runs offline."""

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class Architecture:
    """What the memory planner needs of a model.

    Attributes:
        name: ``model.policy.path`` as given.
        source: where the numbers came from (local folder, Hugging Face cache, carried numbers, demo spec).
        vocab_size / hidden_size / num_layers / intermediate_size: V, H, L and the dense MLP width.
        q_dim / kv_dim: query and key/value widths (heads x head dim); head_dim: one head's width.
        qk_norm: whether queries and keys are normalised per head (Qwen3): two more saved tensors per layer.
        num_experts / experts_per_token / expert_size: E, k and one expert's MLP width (0 for a dense model).
        moe_layers: how many decoder layers are mixture-of-experts.
        tied: the output projection shares the input embedding's weight.
        params: every parameter, counted once; layer_params: the largest decoder layer's; layer_linear_params:
            its weights that run through matrix products (cast to the compute dtype under autocast);
            root_params: parameters outside the decoder layers (embeddings, output head, final norm).
        largest_param: the largest single weight of a layer (its gradient is the backward's weight temporary).
        config_dtype: the checkpoint's ``torch_dtype`` (what ``dtype: auto`` loads), or None.
    """

    name: str
    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    q_dim: int
    kv_dim: int
    head_dim: int
    num_heads: int
    qk_norm: bool
    num_experts: int
    experts_per_token: int
    expert_size: int
    moe_layers: int
    tied: bool
    params: int
    layer_params: int
    layer_linear_params: int
    root_params: int
    largest_param: int
    config_dtype: str | None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def demo_config(spec: DemoSpec):
    """The ``Qwen3MoeConfig`` that :func:`gspo_lightning.demo.model.build_model` builds for ``spec``, without
    building it: vocabulary = the character tokenizer's special tokens and alphabet."""
    from gspo_lightning.demo.model import demo_config as build_config

    return build_config(spec, len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET))


def find_config(name: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    """The transformers config of ``model.policy.path`` and where it came from, without the network.

    Raises:
        ValueError: an unknown ``builtin:`` name, or a model whose config.json is in no local folder, not in the
            Hugging Face cache and not among the carried numbers (one line naming the fix).
    """
    from transformers import AutoConfig

    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        if key not in BUILTINS:
            raise ValueError(f"model.policy.path={name!r}: no such built-in; built-ins: {', '.join(sorted(BUILTINS))}.")
        return demo_config(BUILTINS[key]), "built-in demo spec"
    path = Path(name).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code), f"local folder {path}"
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        return config, "Hugging Face cache"
    except (OSError, ValueError):
        pass
    if name in CARRIED_CONFIGS:
        values = dict(CARRIED_CONFIGS[name])
        return AutoConfig.for_model(values.pop("model_type"), **values), "carried config.json numbers"
    raise ValueError(
        f"model.policy.path={name!r}: its config.json is not in a local folder, not in the Hugging Face cache, and not"
        f" among the models the planner carries ({', '.join(CARRIED_CONFIGS)}); download it once"
        f" (`hf download {name} config.json`) or point model.policy.path at a local folder."
    )


def _meta_model(config: Any, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def _is_moe_layer(layer: nn.Module) -> bool:
    return any(name.rsplit(".", 1)[-1] == "experts" for name, _ in layer.named_modules())


def _linear_params(layer: nn.Module) -> int:
    # norms and biases are 1-D; every weight of a matrix product (linear, stacked experts) has 2 or more dims
    return sum(p.numel() for p in layer.parameters() if p.dim() >= 2)


def architecture_of(config: Any, name: str, source: str, trust_remote_code: bool = False) -> Architecture:
    """An :class:`Architecture` from a transformers config; parameters counted on the meta device."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model = _meta_model(config, trust_remote_code)
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    experts = next((int(getattr(text, k)) for k in _EXPERT_KEYS if getattr(text, k, None)), 0)
    attention = getattr(layers[0], "self_attn", None)
    dtype = getattr(text, "dtype", None)
    return Architecture(
        name=name,
        source=source,
        model_type=str(getattr(text, "model_type", type(config).__name__)),
        vocab_size=int(text.vocab_size),
        hidden_size=int(text.hidden_size),
        num_layers=len(layers),
        intermediate_size=int(getattr(text, "intermediate_size", 0) or 4 * text.hidden_size),
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        head_dim=head_dim,
        num_heads=heads,
        qk_norm=attention is not None and hasattr(attention, "q_norm") and hasattr(attention, "k_norm"),
        num_experts=experts,
        experts_per_token=int(getattr(text, "num_experts_per_tok", 0) or 0) if experts else 0,
        expert_size=int(getattr(text, "moe_intermediate_size", 0) or 0) if experts else 0,
        moe_layers=sum(_is_moe_layer(layer) for layer in layers) if experts else 0,
        tied=bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))),
        params=_count(model.parameters()),
        layer_params=max(_count(layer.parameters()) for layer in layers),
        layer_linear_params=max(_linear_params(layer) for layer in layers),
        root_params=_count(p for p in model.parameters() if id(p) not in in_layers),
        largest_param=max(p.numel() for layer in layers for p in layer.parameters()),
        config_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
    )


def load_architecture(name: str, trust_remote_code: bool = False) -> Architecture:
    """The :class:`Architecture` of ``model.policy.path``, offline (see the module docstring for the sources)."""
    config, source = find_config(name, trust_remote_code)
    return architecture_of(config, name, source, trust_remote_code)


def adapter_params(name: str, peft_config: Any, trust_remote_code: bool = False) -> int:
    """Trainable parameters of ``peft_config``'s adapters on ``model.policy.path``, counted on the meta device."""
    config, _ = find_config(name, trust_remote_code)
    model = _meta_model(config, trust_remote_code)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on pattern keys that match no module of this model
        wrapped = apply_peft(model, peft_config)
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
