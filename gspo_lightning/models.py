"""Loading the policy, reference model and tokenizer through ``from_pretrained``.

A name is a local folder, a hub id, or ``builtin:<name>`` for the embedded demo model, which the project
builds, warms up with a short supervised run, and caches as an ordinary Hugging Face folder (see
``gspo_lightning.demo``), so every path goes through the same ``from_pretrained`` code as a real model.
A name that can only be a local path (``./x``, ``/abs/x``, ``~/x``, ``a/b/c``, ...) is checked here, so a
missing folder fails with its path rather than inside transformers with a message about hub ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

BUILTIN_PREFIX = "builtin:"
DType = Literal["auto", "float32", "bfloat16", "float16"]
Kind = Literal["model", "tokenizer"]
# what from_pretrained needs in a local folder: a model's config, or any of a tokenizer's own files
FOLDER_FILES: dict[str, tuple[str, ...]] = {
    "model": ("config.json",),
    "tokenizer": ("config.json", "tokenizer_config.json", "tokenizer.json"),
}
FIX = (
    "point at a local folder holding config.json (as save_pretrained writes it), or use a hub id such as"
    " Qwen/Qwen3-0.6B"
)
log = logging.getLogger(__name__)


def is_hub_id(name: str) -> bool:
    """Whether ``name`` is a well-formed hub id (``org/name`` or ``name``), by huggingface_hub's own rule."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _local_parent(name: str) -> Path | None:
    """For a hub-like ``org/name``, the local folder ``org`` when it exists (then ``name`` may be a typo'd path)."""
    parent = Path(name).parent
    return parent if name.count("/") == 1 and parent.is_dir() else None


def resolve_pretrained(name: str, kind: Kind = "model") -> str:
    """A ``from_pretrained`` argument for ``name``: a built-in's folder, a checked local folder, or a hub id.

    A built-in demo model is built and cached on first use; ``~`` in a local path is expanded.

    Args:
        name: ``builtin:<name>``, a local folder, or a hub id.
        kind: what is loaded from a local folder: a model needs ``config.json``; a tokenizer needs
            ``config.json``, ``tokenizer_config.json`` or ``tokenizer.json``.

    Raises:
        FileNotFoundError: ``name`` can only be a local path (it is not a well-formed hub id) and does not
            exist, or it is a folder without the files ``kind`` needs.
        NotADirectoryError: ``name`` is a file, not a folder.
    """
    if name.startswith(BUILTIN_PREFIX):
        from gspo_lightning.demo.model import prepare_builtin

        return str(prepare_builtin(name[len(BUILTIN_PREFIX) :]))
    what = "Model" if kind == "model" else "Tokenizer"
    path = Path(name).expanduser()
    if path.is_dir():
        needed = FOLDER_FILES[kind]
        if not any((path / file).is_file() for file in needed):
            raise FileNotFoundError(
                f"{what} folder {name!r} has no {' or '.join(needed)}, so it is not a saved {kind}; point at the "
                f"folder that save_pretrained wrote, or use a hub id such as Qwen/Qwen3-0.6B."
            )
        return str(path)
    if path.exists():
        raise NotADirectoryError(f"{what} path {name!r} is a file, not a folder; {FIX}.")
    if not is_hub_id(name):
        where = "" if str(path.absolute()) == name else f" (looked for {path.absolute()})"
        raise FileNotFoundError(f"{what} folder {name!r} does not exist{where}; {FIX}.")
    return name


def _from_pretrained(auto_class: Any, name: str, kind: Kind, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` on the resolved ``name``, with one clear line when a name fails both ways.

    A hub-like name whose first folder exists here (``outputs/final`` with ``outputs/`` present) is tried on
    the hub, as transformers does; when that fails, the error names the missing local folder too.
    """
    source = resolve_pretrained(name, kind)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as err:
        parent = _local_parent(name) if source == name else None
        if parent is None:
            raise
        reason = next(iter(str(err).splitlines()), type(err).__name__)
        raise OSError(
            f"{kind.capitalize()} {name!r} does not exist here ({parent}/ has no {Path(name).name!r}) and loading it "
            f"as a hub id failed ({reason.rstrip('.')}); fix the local path (a folder holding config.json), or check "
            "the hub id and that the hub is reachable."
        ) from err


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of ``name``, with a pad token (the EOS token when it has none) and left padding.

    Raises:
        FileNotFoundError: see :func:`resolve_pretrained`.
    """
    tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer of {name!r} has neither a pad nor an EOS token; set one of them.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(
    name: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` with the project's conventions.

    Raises:
        FileNotFoundError: see :func:`resolve_pretrained`.
    """
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    kwargs = _model_kwargs(trust_remote_code, attn_implementation)
    return _from_pretrained(AutoModelForCausalLM, name, "model", dtype=torch_dtype, **kwargs)


def _model_kwargs(trust_remote_code: bool, attn_implementation: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def empty_causal_lm(
    name: str,
    dtype: DType = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The model :func:`load_causal_lm` would load, built from its config on the meta device: the same
    modules, parameter names and shapes, no memory and no weights (sharded loading fills them in).

    Raises:
        FileNotFoundError: see :func:`resolve_pretrained`.
    """
    config = _from_pretrained(AutoConfig, name, "model", trust_remote_code=trust_remote_code)
    kwargs = _model_kwargs(trust_remote_code, attn_implementation)
    if dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or torch.float32
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    else:
        torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **kwargs)


def has_dropout(model: nn.Module) -> bool:
    """Whether some dropout of ``model`` is active in train mode (``training.policy.set_dropout_to_zero`` zeroes
    them)."""
    for module in model.modules():
        if isinstance(module, _DropoutNd) and module.p > 0:
            return True
        if any(n.endswith("dropout") and isinstance(v, float) and v > 0 for n, v in vars(module).items()):
            return True
    return False
