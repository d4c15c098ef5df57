"""The registries: names, duplicates, errors, and every registered component on a dummy batch."""

import pytest
import torch
from support import make_batch

from gspo_lightning import (
    ADVANTAGES,
    CLIPS,
    COMPONENT_REGISTRIES,
    KLS,
    MASKS,
    RATIOS,
    MaskInputs,
    Ratio,
    Registry,
    TokenRatio,
)


def test_keys_are_class_names():
    for registry in COMPONENT_REGISTRIES.values():
        for entry in registry.describe():
            assert entry.name == entry.cls.__name__
            assert entry.description and "\n" not in entry.description


def test_duplicate_raises_unless_override():
    reg: Registry[Ratio] = Registry("ratio", Ratio)
    reg.register(TokenRatio)
    with pytest.raises(ValueError, match="already registered.*override=True"):
        reg.register(TokenRatio)

    class TokenRatio2(TokenRatio):
        """Replacement."""

    TokenRatio2.__name__ = "TokenRatio"
    reg.register(TokenRatio2, override=True)
    assert reg.get("TokenRatio") is TokenRatio2


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError, match="SequenceRatio.*SequenceTokenRatio.*TokenRatio"):
        RATIOS.get("GSPO")


def test_wrong_base_and_missing_description():
    reg: Registry[Ratio] = Registry("ratio", Ratio)
    with pytest.raises(TypeError, match="must subclass Ratio"):
        reg.register(int)

    class Undocumented(TokenRatio):
        pass

    Undocumented.__doc__ = None
    with pytest.raises(TypeError, match="needs a description"):
        reg.register(Undocumented)


def _leaf(x):
    return x.clone().requires_grad_(True)


N, T = 6, 5
G = torch.Generator().manual_seed(0)
OLD = -torch.rand(N, T, generator=G) * 2
LP = OLD + 0.1 * torch.randn(N, T, generator=G)
MASK = torch.arange(T)[None, :] < torch.tensor([5, 3, 1, 0, 4, 2])[:, None]


@pytest.mark.parametrize("name", RATIOS.names())
def test_every_ratio(name):
    lp = _leaf(LP)
    out = RATIOS.build(name)(lp, OLD, MASK)
    assert out.shape == (N, T) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[~MASK] == 0).all()


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_advantage(name):
    batch = make_batch([1, 0, 1, 2, 2, 0], group_size=3, response_mask=MASK, old_logprobs=LP, ref_logprobs=OLD)
    out = ADVANTAGES.build(name)(batch)
    assert out.shape in ((N,), (N, T)) and torch.isfinite(out).all() and not out.requires_grad
    assert out.abs().sum() > 0


@pytest.mark.parametrize("name", CLIPS.names())
def test_every_clip(name):
    log_ratio = _leaf(LP - OLD)
    out = CLIPS.build(name)(log_ratio, torch.linspace(-1, 1, N), MASK)
    assert out.loss.shape == (N, T) and torch.isfinite(out.loss).all()
    assert out.clipped_low.dtype == torch.bool and out.clipped_high.shape == (N, T)
    out.loss.sum().backward()
    assert torch.isfinite(log_ratio.grad).all()


@pytest.mark.parametrize("name", KLS.names())
def test_every_kl(name):
    lp = _leaf(LP)
    out = KLS.build(name)(lp, OLD)
    assert out.shape == (N, T) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(lp.grad).all()


REQUIRED = {"OffPolicySequenceMask": {"delta": 0.01}}  # arguments without a default


@pytest.mark.parametrize("name", MASKS.names())
def test_every_token_mask(name):
    lp = _leaf(LP)
    adv = torch.linspace(-1, 1, N)[:, None].expand(N, T).masked_fill(~MASK, 0.0)
    entropy = torch.rand(N, T, generator=torch.Generator().manual_seed(1)).masked_fill(~MASK, 0.0)
    inputs = MaskInputs(lp, OLD, adv, MASK, rollout_logprobs=OLD - 0.05, entropy=entropy, response_ids=MASK.long())
    out = MASKS.build(name, **REQUIRED.get(name, {}))(inputs)
    assert out.weights.shape == (N, T) and torch.isfinite(out.weights).all() and not out.weights.requires_grad
    assert (out.weights[~MASK] == 0).all() and ((out.weights >= 0) & (out.weights <= 1)).all()
    for extra in (out.kl_coef, out.penalty):
        assert extra is None or (extra.shape == (N, T) and torch.isfinite(extra).all())
    if out.penalty is not None:
        out.penalty.sum().backward()
        assert torch.isfinite(lp.grad).all()
    assert all(k.startswith("policy/") for k in out.metrics)
