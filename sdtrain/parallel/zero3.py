"""ZeRO-3 weight gathering: whole weights exist only around the block that needs them.

Forward:  before block i, gather it (waiting for its prefetch) and start gathering blocks
          i+1..i+k; after block i, free it and hook its output so that, in backward, the
          block is gathered again just before its gradients are computed.
Backward: the output hook of block i gathers it and prefetches blocks i-1..i-k; once all
          of a block's gradients are reduce-scattered, the block is freed (zero.py).
Reuse:    the forward's last 1 + k blocks are not freed after their forward: backward starts
          by gathering exactly those again (the last, and k prefetched), so they stay whole
          instead, through the head and loss (DeepSpeed's stage3_max_reuse_distance does the
          same). That is no more whole blocks than backward's start holds anyway, and saves
          (1 + k) blocks' gathers per micro-batch. On CPU it pays: moving bytes over gloo
          takes the cores from compute (bench-20m, 2 ranks: ~6 ms of a rank's CPU time for each
          block gathered, the forward's seven ~9% of a DDP step's).
The root units (embeddings, final norm, tied output head: one per placement's reduction,
usually one) are used at both ends of the model: they are gathered when the model's forward
starts (and again before the head and loss, which run after it, and before each backward)
and freed after their gradients.

Freeing resizes the flat buffer's storage to zero; gathering resizes it back and fills it.
Parameters stay views of that storage, so tensors autograd saved in forward see the data
again in backward.

With the weight shards offloaded (`shards`, offload/params.py), a gather first needs its
shard back in memory: the read of a block's shards is started one block ahead of its gather
prefetch (an all-gather must have its input when it is issued, and issuing collectives from
an I/O thread would order them differently on each rank), so reading block i+1+k overlaps
computing block i while block i+1..i+k's all-gathers run; the staged shard goes once its
all-gather is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from sdtrain.parallel.comm import Comm
from sdtrain.parallel.flat_unit import FlatUnit

if TYPE_CHECKING:
    from sdtrain.parallel.offload.params import OffloadedShards


class ParamGatherer:
    def __init__(self, model: nn.Module, blocks: list[list[FlatUnit]], roots: list[FlatUnit], comm: Comm,
                 prefetch: int, shards: OffloadedShards | None = None):
        # blocks[i]: block i's units (its dense weights, and its experts' under expert
        # parallelism, which gather over their own group: each unit names its comm)
        self.blocks, self.roots, self.comm, self.prefetch = blocks, roots, comm, prefetch
        self.shards = shards  # offloaded weight shards, or None: unit.shard is always there
        self.in_flight: dict[int, object] = {}  # id(unit) -> async work
        self.kept_for_backward = range(max(len(blocks) - 1 - prefetch, 0), len(blocks))
        model.register_forward_pre_hook(lambda module, args: self._forward_starts())
        # The head and loss run after the forward (on the part that has them): the root
        # stays gathered through them, and in evaluation is freed after the last use.
        last_use = model.head_loss if getattr(model, "head_loss", None) is not None else model
        if last_use is not model:
            last_use.register_forward_pre_hook(lambda module, args: self._gather_roots())
        last_use.register_forward_hook(self._after_last_use)
        for i, block in enumerate(model.blocks.values()):
            block.register_forward_pre_hook(lambda module, args, i=i: self._before_block(i))
            block.register_forward_hook(lambda module, args, output, i=i: self._after_block(i, output))

    # --- gather / free -----------------------------------------------------------------

    def gathered(self, unit: FlatUnit) -> bool:
        return unit.full.untyped_storage().nbytes() > 0

    def gather(self, unit: FlatUnit | None, async_op: bool = False) -> None:
        if unit is None:
            return
        if id(unit) in self.in_flight:
            if not async_op:
                self._settle(unit)
            return
        if self.gathered(unit):
            return
        shard = unit.shard if self.shards is None else self.shards.shard(unit)
        unit.full.untyped_storage().resize_(unit.padded * unit.full.element_size())
        work = getattr(unit, "comm", self.comm).all_gather(unit.full, shard, async_op=async_op)
        if async_op:
            self.in_flight[id(unit)] = work
        elif self.shards is not None:
            self.shards.release(unit)

    def _settle(self, unit: FlatUnit) -> None:
        """Wait for unit's all-gather; its staged shard, if offloaded, can go."""
        self.in_flight.pop(id(unit)).wait()
        if self.shards is not None:
            self.shards.release(unit)

    def _read_ahead(self, units: list[FlatUnit]) -> None:
        """Start reading offloaded shards of units not gathered nor gathering."""
        if self.shards is None:
            return
        for unit in units:
            if id(unit) not in self.in_flight and not self.gathered(unit):
                self.shards.read_ahead(unit)

    def _forward_starts(self) -> None:
        self._read_ahead([u for block in self.blocks[: 1 + self.prefetch] for u in block])
        self._gather_roots()

    def _gather_roots(self) -> None:
        for unit in self.roots:
            self.gather(unit)

    def free_all(self) -> None:
        """Free whatever is still whole (the persistent unit aside), once the shards hold new
        weights: a unit kept whole for a backward that did not come (a forward without one)
        must not pass for gathered with its old ones."""
        for unit in (*(u for block in self.blocks for u in block), *self.roots):
            self.free(unit)
        if self.shards is not None:
            self.shards.drop_reads()

    def free(self, unit: FlatUnit) -> None:
        if unit.name == "persistent" or not self.gathered(unit):
            return
        if id(unit) in self.in_flight:
            self._settle(unit)  # never free a buffer a collective is still writing into
        unit.full.untyped_storage().resize_(0)

    # --- hooks -------------------------------------------------------------------------

    def _gather_block(self, i: int, async_op: bool = False) -> None:
        for unit in self.blocks[i]:
            self.gather(unit, async_op=async_op)

    def _before_block(self, i: int) -> None:
        self._gather_block(i)
        for j in range(i + 1, min(i + 1 + self.prefetch, len(self.blocks))):
            self._gather_block(j, async_op=True)
        if i + 1 + self.prefetch < len(self.blocks):
            self._read_ahead(self.blocks[i + 1 + self.prefetch])

    def _after_block(self, i: int, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad, i=i: self._before_block_backward(i))
            if i in self.kept_for_backward:
                return  # freed once its gradients are reduce-scattered, as every block is
        for unit in self.blocks[i]:
            self.free(unit)

    def _before_block_backward(self, i: int) -> None:
        self._gather_block(i)
        for j in range(i - 1, max(i - 1 - self.prefetch, -1), -1):
            self._gather_block(j, async_op=True)
        if i - 1 - self.prefetch >= 0:
            self._read_ahead(self.blocks[i - 1 - self.prefetch])

    def _after_last_use(self, module, args, output) -> None:
        if not torch.is_grad_enabled():
            for unit in self.roots:
                self.free(unit)  # evaluation: no backward will need it
        elif isinstance(output, torch.Tensor) and output.requires_grad:
            # The roots are freed once their gradients are reduce-scattered, after a micro-batch's
            # backward: where a schedule runs several forwards before their backwards (GPipe), the
            # next backward needs them whole again. Gathered before it starts (a no-op where a
            # forward in between gathered them already).
            output.register_hook(lambda grad: self._gather_roots())
