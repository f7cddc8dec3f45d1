"""Token dispatchers: how an MoE layer's capacity buffer [E, C, d] reaches its experts and
comes back. Chosen from outside the model (as torchtitan does): LocalDispatch when one rank
holds every expert, AllToAllDispatch under expert parallelism.

Both take a rank's kept token copies sorted by expert and the count per expert, and give
back the experts' outputs in the same order. All-to-all layout: rank q of the expert-parallel
group holds experts q*E_local .. ; source rank s sends it the rows of those experts (uneven:
however many were kept). The receiver lines up each expert's rows from every source (source
order) and runs all of its experts in one grouped matmul; the way back is the exact reverse.
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


class Permute(torch.autograd.Function):
    """Rows reordered by an index, and back in backward: a gather both ways (indexing's own
    backward would scatter-add)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def source_to_expert_order(received: torch.Tensor) -> torch.Tensor:
    """received [sources, experts]: the row counts that arrived, source-major (each source's
    rows grouped by expert). The index that reorders them expert-major (each expert's rows
    from every source, in source order), as the grouped matmul wants them."""
    lengths = received.reshape(-1)
    start = torch.cumsum(lengths, 0) - lengths  # where each (source, expert) block is now
    by_expert = received.t().reshape(-1)
    start_by_expert = start.view_as(received).t().reshape(-1)
    target = torch.cumsum(by_expert, 0) - by_expert  # where it goes
    shift = torch.repeat_interleave(start_by_expert - target, by_expert)
    return torch.arange(shift.numel(), device=shift.device) + shift


def inverse_of(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class LocalDispatch:
    def __call__(self, experts, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return experts(tokens, counts)


class AllToAllDispatch:
    """tokens [N, d] sorted by global expert, counts [E]: each rank's rows go to the rank
    holding their expert, exactly as many as were kept (no capacity padding on the wire),
    after one small all-to-all of the counts."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def __call__(self, experts, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local = counts.numel() // self.size
        received = torch.empty_like(counts)
        AllToAllClock.run(received, counts, [local] * self.size, [local] * self.size, self.group)
        received = received.view(self.size, local)  # [source, my expert]
        send = counts.view(self.size, local).sum(1).tolist()
        receive = received.sum(1).tolist()
        arrived = AllToAll.apply(tokens, receive, send, self.group)
        order = source_to_expert_order(received)
        inverse = inverse_of(order)
        out = experts(Permute.apply(arrived, order, inverse), received.sum(0))
        return AllToAll.apply(Permute.apply(out, inverse, order), send, receive, self.group)
