"""GSPOModule outside the Trainer: what it loads and which options it refuses."""

import pytest

from gspo_lightning import ContrastAdvantage, TokenRatio
from gspo_lightning.module import GSPOModule


def _module(tiny_path, **kwargs):
    module = GSPOModule(model=tiny_path, **kwargs)
    module.configure_model()
    return module


def test_reference_only_when_needed(tiny_path):
    assert _module(tiny_path, kl_coef=0.0).reference is None
    with_kl = _module(tiny_path, kl_coef=0.1, ratio=TokenRatio())
    assert with_kl.reference is not None and not any(p.requires_grad for p in with_kl.reference.parameters())
    assert "reference" not in "".join(with_kl.state_dict())  # not saved in checkpoints
    assert _module(tiny_path, advantage=ContrastAdvantage()).reference is not None


def test_bad_module_options(tiny_path):
    with pytest.raises(ValueError, match="mini_batches"):
        GSPOModule(model=tiny_path, mini_batches=0)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GSPOModule(model=tiny_path, micro_batch_size=0)
