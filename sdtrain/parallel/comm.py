"""Collectives on flat buffers, with a count of the bytes they move.

Every ZeRO collective goes through here, so the bytes a step communicates are measured from
the calls themselves (the number the ZeRO paper predicts: about 2Ψ elements per step for
stages 1 and 2, 3Ψ for stage 3), not estimated.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist


class Comm:
    def __init__(self, group, overlap: bool = True):
        self.group = group
        self.overlap = overlap
        self.bytes = defaultdict(int)  # per collective kind, since the last reset

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = False):
        """full <- concatenation of every rank's shard."""
        self.bytes["all_gather"] += full.numel() * full.element_size()
        return dist.all_gather_into_tensor(full, shard, group=self.group, async_op=async_op)

    def reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor, async_op: bool = False):
        """shard <- this rank's chunk of the average of every rank's full."""
        self.bytes["reduce_scatter"] += full.numel() * full.element_size()
        return dist.reduce_scatter_tensor(shard, full, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes["all_reduce"] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def take_bytes(self) -> dict[str, int]:
        """Bytes moved since the last call, per kind."""
        counted, self.bytes = dict(self.bytes), defaultdict(int)
        return counted
