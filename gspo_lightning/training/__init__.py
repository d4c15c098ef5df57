"""The trainer side, one file per stage of a rollout batch's way through :class:`~gspo_lightning.GSPOModule`.

``policy`` (loading) -> ``pre_update`` (pi_old, reference, KL in reward, mismatch weights, advantages; no
gradient) -> ``splits`` (mini- and micro-batches) -> ``update`` (the loss of one micro-batch, over
``logprobs``) -> ``strategy`` (what differs per Lightning strategy) -> ``metrics`` (what is logged).
``guard`` skips non-finite steps; ``optim`` builds the optimizer.
"""
