"""Token dispatchers: how an MoE layer's capacity buffer [E, C, d] reaches its experts and
comes back. Chosen from outside the model (as torchtitan does): LocalDispatch when one rank
holds every expert, AllToAllDispatch under expert parallelism.

All-to-all layout: rank q of the expert-parallel group holds experts q*E_local .. ; source
rank s sends it the rows of those experts, E_local x C_s tokens (C_s: s's capacity, the same
everywhere unless dropless). The receiver lines up each expert's tokens from every source
(source order) and runs all of its experts in one batched matmul; the way back is the exact
reverse.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class AllToAllClock:
    """Wall seconds this process spent in the MoE all-to-alls (dispatch and combine, forward
    and backward), and the wall time since the clock was last read: metrics.jsonl's
    `moe_all_to_all_share`. On CUDA the calls are timed to their completion."""

    seconds = 0.0
    since: float | None = None  # the first all-to-all, or the last read

    @classmethod
    def run(cls, out: torch.Tensor, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> None:
        started = time.perf_counter()
        if cls.since is None:
            cls.since = started
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
        if out.is_cuda:
            torch.cuda.current_stream().synchronize()
        cls.seconds += time.perf_counter() - started

    @classmethod
    def take_share(cls) -> float | None:
        """The share of wall time spent in all-to-alls since the last read (None: none ran)."""
        if cls.since is None:
            return None
        now = time.perf_counter()
        share = cls.seconds / (now - cls.since) if now > cls.since else 0.0
        cls.seconds, cls.since = 0.0, now
        return share


class AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        AllToAllClock.run(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        AllToAllClock.run(grad_in, grad.contiguous(), in_splits, out_splits, ctx.group)
        return grad_in, None, None, None


class LocalDispatch:
    def __call__(self, experts, buffer: torch.Tensor, dropless: bool) -> torch.Tensor:
        return experts(buffer)


class AllToAllDispatch:
    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def capacities(self, capacity: int, dropless: bool, device: torch.device) -> list[int]:
        """Every ep rank's capacity: the same unless dropless (each its own largest load)."""
        if not dropless:
            return [capacity] * self.size
        mine = torch.tensor([capacity], dtype=torch.int64, device=device)
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine, group=self.group)
        return [int(c) for c in every]

    def __call__(self, experts, buffer: torch.Tensor, dropless: bool) -> torch.Tensor:
        num_experts, capacity, d = buffer.shape
        capacities = self.capacities(capacity, dropless, buffer.device)
        local = num_experts // self.size
        send = [local * capacity] * self.size
        receive = [local * c for c in capacities]
        arrived = AllToAll.apply(buffer.reshape(-1, d), receive, send, self.group)
        per_source = [chunk.view(local, c, d) for chunk, c in zip(arrived.split(receive), capacities)]
        out = experts(torch.cat(per_source, dim=1))  # [E_local, sum C_s, d]
        back = torch.cat([chunk.reshape(-1, d) for chunk in out.split(capacities, dim=1)])
        return AllToAll.apply(back, send, receive, self.group).view(num_experts, capacity, d)
