"""Mixture-of-experts support: routing shape, router statistics, Routing Replay and routing-change metrics."""

from gspo_lightning.moe.layout import MoELayout, moe_layout
from gspo_lightning.moe.routing import RoutingController, find_routers, routing_change_frac, routing_context
from gspo_lightning.moe.stats import RouterStats, RouterStatsResult

__all__ = [
    "MoELayout",
    "RouterStats",
    "RouterStatsResult",
    "RoutingController",
    "find_routers",
    "moe_layout",
    "routing_change_frac",
    "routing_context",
]
