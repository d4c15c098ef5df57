"""``gspo-lightning plan``: the memory budget of a run per device, from its configuration alone.

``architecture`` reads the model's numbers offline, ``run`` what the configuration asks for, ``activations``
and ``budget`` count the bytes, ``report`` assembles and prints them.
"""

from gspo_lightning.plan.report import DOES_NOT_FIT_STATUS, MemoryPlan, advice, plan_run, render
from gspo_lightning.plan.run import parse_memory

__all__ = ["DOES_NOT_FIT_STATUS", "MemoryPlan", "advice", "parse_memory", "plan_run", "render"]
