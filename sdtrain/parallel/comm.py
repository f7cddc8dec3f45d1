"""Collectives on flat buffers, with a count of the bytes they move.

Every ZeRO collective goes through here, so the bytes a step communicates are measured from
the calls themselves (the number the ZeRO paper predicts: about 2Ψ elements per step for
stages 1 and 2, 3Ψ for stage 3), not estimated.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from sdtrain.parallel.ring import RingAllGather, RingReduceScatter

# torch 2.13 renamed the flat-buffer collectives and warns (FutureWarning, in every rank's
# log) on the old names; older torch has only those. Looked up at call time: the hang
# watchdog's record wraps torch.distributed's functions after this module is imported.
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"


class Comm:
    def __init__(self, group, overlap: bool = True):
        self.group = group
        self.overlap = overlap
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        # gloo has no reduce-scatter of its own (torch's clones the input and all-reduces
        # the clone: twice the bytes) and a slow all-gather: both go around a ring there.
        self.by_ring = dist.get_backend(group) == "gloo"
        self.spare: list[torch.Tensor] = []  # receive buffers of finished ring reduce-scatters
        self.bytes = defaultdict(int)  # per collective kind, since the last reset

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = False):
        """full <- concatenation of every rank's shard. `shard` may be this rank's chunk of
        `full` itself (no copy is made then, on gloo)."""
        self.bytes["all_gather"] += full.numel() * full.element_size()
        own = full[self.rank * shard.numel() : (self.rank + 1) * shard.numel()]
        in_place = own.data_ptr() == shard.data_ptr()
        if not self.by_ring:
            shard = shard.clone() if in_place else shard  # the collective reads what it overwrites
            return getattr(dist, ALL_GATHER)(full, shard, group=self.group, async_op=async_op)
        if not in_place:
            own.copy_(shard)
        return self._ring(RingAllGather(full, self.group, self.rank, self.world), async_op)

    def reduce_scatter(self, full: torch.Tensor, async_op: bool = False) -> tuple[object, torch.Tensor]:
        """This rank's chunk of the average of every rank's `full`, as (work, chunk); the
        chunk is ready once work (None when synchronous) has been waited for. On gloo the
        chunk is a view of `full`, whose other chunks are left holding partial sums."""
        self.bytes["reduce_scatter"] += full.numel() * full.element_size()
        chunk_size = full.numel() // self.world
        if self.world == 1:
            return None, full  # the average of one
        if self.by_ring:
            received = self._spare_buffer(chunk_size, full)
            ring = RingReduceScatter(full, self.group, self.rank, self.world, received,
                                     when_done=lambda: self.spare.append(received))
            return self._ring(ring, async_op), full[self.rank * chunk_size : (self.rank + 1) * chunk_size]
        chunk = torch.empty(chunk_size, dtype=full.dtype, device=full.device)
        work = getattr(dist, REDUCE_SCATTER)(chunk, full, op=dist.ReduceOp.AVG, group=self.group, async_op=async_op)
        return work, chunk

    def _spare_buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A buffer of at least `numel` elements: a spare one where it fits (as many are kept
        as reduce-scatters were ever in flight at once, each as large as the largest chunk)."""
        for i, buffer in enumerate(self.spare):
            if buffer.numel() >= numel and buffer.dtype == like.dtype:
                return self.spare.pop(i)
        if self.spare:
            self.spare.pop()  # too small: replaced by a larger one
        return torch.empty(numel, dtype=like.dtype, device=like.device)

    @staticmethod
    def _ring(work, async_op: bool):
        if async_op:
            return work
        work.wait()
        return None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes["all_reduce"] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def take_bytes(self) -> dict[str, int]:
        """Bytes moved since the last call, per kind."""
        counted, self.bytes = dict(self.bytes), defaultdict(int)
        return counted
