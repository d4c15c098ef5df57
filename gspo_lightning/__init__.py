"""gspo-lightning: Lightning-native RL fine-tuning of LLMs with GSPO and its relatives."""

from gspo_lightning.batch import RolloutBatch
from gspo_lightning.components.advantage import (
    ADVANTAGES,
    Advantage,
    ContrastAdvantage,
    GroupMeanAdvantage,
    GroupNormAdvantage,
    RLOOAdvantage,
)
from gspo_lightning.components.aggregation import AGGREGATION_MODES, AggregationMode, LossCounts, aggregate
from gspo_lightning.components.cispo import CISPOClip
from gspo_lightning.components.clip import CLIPS, LOG_RATIO_BOUND, Clip, ClipOutput, DualClip, NoClip, PPOClip
from gspo_lightning.components.gmpo import GMPOClip
from gspo_lightning.components.kl import K1KL, K2KL, K3KL, KL, KLS
from gspo_lightning.components.masks import (
    MASKS,
    DivergenceMask,
    MaskInputs,
    MaskOutput,
    OffPolicySequenceMask,
    TokenMask,
)
from gspo_lightning.components.objective import ObjectiveOutput, PolicyObjective
from gspo_lightning.components.ratio import RATIOS, Ratio, SequenceRatio, SequenceTokenRatio, TokenRatio
from gspo_lightning.components.sapo import SAPOGate
from gspo_lightning.components.token_selection import ClipCov, HighEntropyTokens, KLCov
from gspo_lightning.registry import Registry, RegistryEntry

COMPONENT_REGISTRIES: dict[str, Registry] = {
    "ratio": RATIOS,
    "advantage": ADVANTAGES,
    "clip": CLIPS,
    "kl": KLS,
    "token_mask": MASKS,
}

__version__ = "0.1.0"

__all__ = [
    "ADVANTAGES",
    "AGGREGATION_MODES",
    "CLIPS",
    "COMPONENT_REGISTRIES",
    "K1KL",
    "K2KL",
    "K3KL",
    "KL",
    "KLS",
    "LOG_RATIO_BOUND",
    "MASKS",
    "RATIOS",
    "Advantage",
    "AggregationMode",
    "CISPOClip",
    "Clip",
    "ClipCov",
    "ClipOutput",
    "ContrastAdvantage",
    "DivergenceMask",
    "DualClip",
    "GMPOClip",
    "GroupMeanAdvantage",
    "GroupNormAdvantage",
    "HighEntropyTokens",
    "KLCov",
    "LossCounts",
    "MaskInputs",
    "MaskOutput",
    "NoClip",
    "ObjectiveOutput",
    "OffPolicySequenceMask",
    "PPOClip",
    "PolicyObjective",
    "RLOOAdvantage",
    "Ratio",
    "Registry",
    "RegistryEntry",
    "RolloutBatch",
    "SAPOGate",
    "SequenceRatio",
    "SequenceTokenRatio",
    "TokenMask",
    "TokenRatio",
    "aggregate",
]
