"""Mixture-of-Experts parts of the built-in GPT: routing (gating.py) and aux-loss-free
balancing (balance.py); the layer, experts and dispatch live beside them."""

from sdtrain.model.moe.balance import BiasBalancer, update_balancers
from sdtrain.model.moe.gating import Routing, capacity_for, route, router_z_loss, top_k_gating

__all__ = [
    "BiasBalancer",
    "Routing",
    "capacity_for",
    "route",
    "router_z_loss",
    "top_k_gating",
    "update_balancers",
]
