"""Callbacks for monitoring and export (nothing training needs to be correct lives here)."""

from gspo_lightning.callbacks.heldout import HeldOutReport
from gspo_lightning.callbacks.hf_export import HFExport
from gspo_lightning.callbacks.moe_monitor import MoEMonitor
from gspo_lightning.callbacks.progress import StepRichProgressBar, StepTQDMProgressBar
from gspo_lightning.callbacks.samples import SampleLogger
from gspo_lightning.callbacks.stop import GracefulStop as GracefulStop  # the CLI adds it to every run

__all__ = ["HFExport", "HeldOutReport", "MoEMonitor", "SampleLogger", "StepRichProgressBar", "StepTQDMProgressBar"]
