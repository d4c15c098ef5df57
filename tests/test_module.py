"""GSPOModule outside the Trainer: what it loads and which options it refuses."""

import pytest
from support import built_module, grouped

from gspo_lightning import ContrastAdvantage, TokenRatio
from gspo_lightning.module import GSPOModule


def test_reference_only_when_needed(tiny_path):
    assert built_module(tiny_path, kl_coef=0.0).reference is None
    with_kl = built_module(tiny_path, kl_coef=0.1, ratio=TokenRatio())
    assert with_kl.reference is not None and not any(p.requires_grad for p in with_kl.reference.parameters())
    assert "reference" not in "".join(with_kl.state_dict())  # not saved in checkpoints
    assert built_module(tiny_path, advantage=ContrastAdvantage()).reference is not None


def test_bad_module_options(tiny_path):
    with pytest.raises(ValueError, match="mini_batches"):
        GSPOModule(**grouped("model", model=tiny_path, mini_batches=0))
    with pytest.raises(ValueError, match="micro_batch_size"):
        GSPOModule(**grouped("model", model=tiny_path, micro_batch_size=0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0: clipping needs a positive norm"),
        ({"max_grad_norm": 0.0}, "max_grad_norm=0.0"),
        ({"kl_coef": -0.1, "kl_in_reward": True}, "kl_coef=-0.1"),
        ({"aggregation": "seq-mean-token-sum-norm"}, "set model.loss.max_new_tokens"),
    ],
)
def test_options_that_would_train_silently_wrong_are_refused(tiny_path, options, message):
    with pytest.raises(ValueError, match=message):
        GSPOModule(**grouped("model", model=tiny_path, **options))
