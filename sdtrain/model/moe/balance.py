"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2408.15664; torchtitan's MoE): a
per-expert bias added to the router's scores only to choose experts, nudged after each
optimizer step toward equal load. The combine weights stay the unbiased probabilities, so the
bias steers traffic without entering the loss or its gradient."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


class BiasBalancer(nn.Module):
    """Holds the bias (a checkpointed buffer) and the load counted since the last update.

    The MoE layer routes with `selection_bias=balancer.bias` and calls `observe` with each
    routing's `tokens_per_expert`; the training step calls `update_balancers` once after the
    optimizer step."""

    def __init__(self, num_experts: int, rate: float = 1e-3):
        super().__init__()
        self.rate = rate
        self.register_buffer("bias", torch.zeros(num_experts))
        # Not persistent: it is emptied by every update, so a checkpoint never holds a partial count.
        self.register_buffer("load", torch.zeros(num_experts), persistent=False)

    @torch.no_grad()
    def observe(self, tokens_per_expert: torch.Tensor) -> None:
        if self.training:
            self.load += tokens_per_expert.to(self.load.dtype)

    @torch.no_grad()
    def update(self, load: torch.Tensor) -> None:
        """Raise the bias of experts below the mean load and lower the others by `rate`,
        centred so that the biases keep summing to zero (torchtitan's rule)."""
        delta = self.rate * torch.sign(load.mean() - load)
        self.bias += delta - delta.mean()
        self.load.zero_()


@torch.no_grad()
def update_balancers(
    balancers: Iterable[BiasBalancer],
    all_reduce_sum: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """One step's update for every MoE layer, with the loads summed over all ranks that route
    tokens (one collective for all layers) so that every rank applies the same nudge and the
    bias is the same at any data- or expert-parallel size."""
    balancers = list(balancers)
    if not balancers:
        return
    loads = torch.stack([b.load for b in balancers])
    if all_reduce_sum is not None:
        all_reduce_sum(loads)
    for balancer, load in zip(balancers, loads):
        balancer.update(load)
