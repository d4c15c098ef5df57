"""Bytes of the tensors one forward and backward keep, per micro-batch: activations, the log-prob head, generation.

Counted from what the transformers decoder layers save for backward (checked against the tensor bytes torch's
profiler sees allocated, ``tests/plan/test_plan_activations.py``), per token of a layer, with H the hidden size,
q / kv the query and key-value widths, I the MLP width, k of E experts of width I_e:

- the two RMSNorms: the input and the normalised input in float32 (4H x 4 B) and the output (2H);
- attention: the rotated query and key, the value, the output (2q + 2kv), one log-sum-exp per head, and with
  per-head query/key norms (Qwen3) their inputs and normalised values (2q + 2kv more);
- a dense MLP: gate, activation, up and their product (4I); an MoE layer: the router's logits and
  probabilities (2E) and, per routed pair, the token's input and output (2H) and gate-up, activation and
  product (4 I_e).

With gradient checkpointing a layer keeps only its input (H); one layer is recomputed at a time in backward.
The backward frees each layer's saved tensors as it passes; what it adds on top is the gradients of a layer's
input and output (2H per token, fp32) and of its largest weight (each weight's gradient is accumulated as soon
as it is computed), and under checkpointing the recomputed layer.

The log-prob head (``training.logprobs``) runs over chunks of C response tokens: its backward holds 5 fp32
``(C, V)`` tensors (the recomputed scaled logits, the gather and log-sum-exp gradients and their temporaries)
and one ``(V, H)``: the output weight's gradient, which autograd sums over the chunks before accumulating it;
without gradient, 2 ``(C, V)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gspo_lightning.plan.architecture import Architecture

FP32 = 4


@dataclass(frozen=True)
class Widths:
    """Element sizes: ``compute`` for matrix-product outputs (2 under bfloat16 or float16), ``stream`` for the
    residual stream (the parameters' dtype, or ``compute`` when FSDP2 casts them), ``key`` for cached keys."""

    compute: int
    stream: int
    key: int


def layer_bytes_per_token(arch: Architecture, w: Widths, moe: bool) -> float:
    """Bytes one decoder layer saves for backward per token, without checkpointing (module docstring)."""
    h, q, kv = arch.hidden_size, arch.q_dim, arch.kv_dim
    norms = 4 * h * FP32 + 2 * h * w.compute
    attention = (2 * q + 2 * kv) * w.compute + arch.num_heads * FP32
    if arch.qk_norm:
        attention += (2 * q + 2 * kv) * FP32
    if moe:
        k = arch.experts_per_token
        mlp = 2 * arch.num_experts * FP32 + k * (2 * h + 4 * arch.expert_size) * w.compute
    else:
        mlp = 4 * arch.intermediate_size * w.compute
    return norms + attention + mlp


def decoder_bytes_per_token(arch: Architecture, w: Widths) -> tuple[float, float]:
    """(all layers' saved bytes per token, the largest layer's) without checkpointing."""
    moe = layer_bytes_per_token(arch, w, True) if arch.is_moe else 0.0
    dense = layer_bytes_per_token(arch, w, False)
    layers = arch.moe_layers * moe + (arch.num_layers - arch.moe_layers) * dense
    return layers, max(moe, dense)


def model_bytes_per_token(arch: Architecture, response_share: float) -> float:
    """Saved once per forward, outside the layers: rotary cos/sin, the final norm, the head's input rows."""
    return 2 * arch.head_dim * FP32 + 2 * arch.hidden_size * FP32 + response_share * arch.hidden_size * FP32


@dataclass(frozen=True)
class ActivationPeak:
    """Bytes of one micro-batch's forward and backward on top of the model's state.

    Attributes:
        saved: kept from the forward until the backward reaches them.
        backward: the most the backward adds on top (one layer's gradients, or its recomputation).
        head: the log-prob head's backward on one chunk (fp32 chunk logits and the output weight's gradient).
    """

    saved: float
    backward: float
    head: float

    @property
    def peak(self) -> float:
        return self.saved + max(self.backward, self.head)


def head_bytes(arch: Architecture, chunk: int, grad_bytes: int, with_grad: bool) -> float:
    """The log-prob head on ``chunk`` response tokens: in backward 5 fp32 ``(C, V)`` and the ``(V, H)`` weight
    gradient autograd sums the chunks' contributions in; without gradient 2 ``(C, V)`` (scaled logits, the
    log-sum-exp's temporary)."""
    v = arch.vocab_size
    if not with_grad:
        return 2 * chunk * v * FP32
    return 5 * chunk * v * FP32 + v * arch.hidden_size * grad_bytes


def train_micro_batch(
    arch: Architecture, w: Widths, tokens: int, response: int, chunk: int, checkpointing: bool, grad_bytes: int
) -> ActivationPeak:
    """Activations of a training micro-batch of ``tokens`` (``response`` of them response tokens)."""
    layers, largest = decoder_bytes_per_token(arch, w)
    model_level = model_bytes_per_token(arch, response / max(tokens, 1)) * tokens
    router = arch.moe_layers * tokens * arch.num_experts * FP32  # router logits kept for the MoE statistics
    # a layer's backward: gradients of its input and output (2H per token) and of a weight (accumulated one by one)
    backward = 2 * arch.hidden_size * FP32 * tokens + arch.largest_param * grad_bytes
    if checkpointing:
        saved = arch.num_layers * arch.hidden_size * w.stream * tokens + model_level + router
        backward += largest * tokens  # the layer being recomputed holds its saved tensors again
    else:
        saved = layers * tokens + model_level + router
    return ActivationPeak(saved, backward, head_bytes(arch, min(chunk, max(response, 1)), grad_bytes, True))


def no_grad_micro_batch(arch: Architecture, w: Widths, tokens: int, response: int, chunk: int) -> float:
    """The pre-update pass (pi_old, reference) on one micro-batch: nothing is saved, so one layer's temporaries
    are alive at a time: the residual stream (the layer's input, the branch output, their sum: 3H), the rotary
    cos/sin, and the wider of attention (the normalised input,
    query, key and value before and after rotation) and the MLP (gate, up and activation: 3I, or per routed pair
    the token and 3 I_e, plus the router's E)."""
    h = arch.hidden_size
    attention = h + 2 * (arch.q_dim + 2 * arch.kv_dim)
    mlp = 3 * arch.intermediate_size
    if arch.is_moe:
        mlp = max(mlp, arch.num_experts + arch.experts_per_token * (h + 3 * arch.expert_size))
    layer = (3 * h * w.stream + 2 * arch.head_dim * FP32 + max(attention, mlp) * w.compute) * tokens
    return max(layer, head_bytes(arch, min(chunk, max(response, 1)), 0, False))


def kv_cache_bytes(arch: Architecture, w: Widths, sequences: int, length: int) -> float:
    """transformers' ``DynamicCache`` for ``sequences`` of ``length`` tokens: keys and values of every layer,
    plus one layer's copy while ``torch.cat`` grows it."""
    per_layer = sequences * length * arch.kv_dim * (w.key + w.compute)
    return per_layer * (arch.num_layers + 1)


def decode_logits_bytes(arch: Architecture, w: Widths, sequences: int) -> float:
    """One decoding step's logits: the model's ``(n, V)`` and generate's fp32 copy, scaled scores, probabilities
    and the log-prob recorder's previous step (``engines.transformers_engine``)."""
    return sequences * arch.vocab_size * (w.compute + 4 * FP32)
