"""The collectives of tensor parallelism, as autograd functions whose backward is the mirror
collective (Megatron-LM's `mappings.py`), on a group that counts the bytes it moves.

Without sequence parallelism the activations between layers are whole, and equal on every
tp rank:
- `copy_to_tp` ("f"): identity forward, all-reduce backward. Before a column-parallel layer:
  each rank's columns give a partial gradient of the input, summed over the ranks.
- `reduce_from_tp` ("g"): all-reduce forward, identity backward. After a row-parallel layer:
  each rank's rows give a partial output.
With sequence parallelism (Korthikanti et al. 2022) the activations between layers are split
along the sequence (dim 1 of [batch, sequence, features]), and the two become:
- `gather_sequence`: all-gather forward, reduce-scatter backward (in place of f);
- `reduce_scatter_sequence`: reduce-scatter forward, all-gather backward (in place of g).
An all-reduce is a reduce-scatter and an all-gather, so both move the same volume.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sdtrain.parallel.comm import ALL_GATHER, REDUCE_SCATTER
from sdtrain.parallel.ring import RingAllGather, RingReduceScatter

SEQUENCE_DIM = 1  # activations are [batch, sequence, features]


class _Done:
    """The work of a collective that has already completed."""

    @staticmethod
    def wait() -> bool:
        return True


DONE = _Done()


@dataclass
class TensorParallel:
    """The tensor-parallel group of this rank (`size` ranks, this one `rank` among them), and
    the bytes its collectives moved since `take_bytes`: per kind, each collective counted at
    its whole tensor's size (an all-gather's output, a reduce-scatter's input), as comm.py
    counts ZeRO's."""

    group: object
    size: int
    rank: int
    sequence_parallel: bool = False
    # gloo's all-gather is slow and it has no reduce-scatter (torch's all-reduces a clone): on
    # gloo both go around ring.py's rings, as ZeRO's do
    by_ring: bool = False
    bytes: dict = field(default_factory=lambda: defaultdict(int))

    @classmethod
    def of(cls, group, sequence_parallel: bool = False) -> TensorParallel:
        return cls(group, dist.get_world_size(group), dist.get_rank(group), sequence_parallel,
                   by_ring=dist.get_backend(group) == "gloo")

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> torch.Tensor:
        """In place. `kind`: the name it is counted under (the gradient sums apart from the
        activations, whose bytes the Megatron accounting predicts)."""
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=op, group=self.group)
        return tensor

    def gather_sequence(self, shard: torch.Tensor) -> torch.Tensor:
        """[B, T / size, d] from every rank -> [B, T, d], in rank order along the sequence."""
        whole, work = self.start_gather_sequence(shard)
        work.wait()
        return whole

    def start_gather_sequence(self, shard: torch.Tensor) -> tuple[torch.Tensor, object]:
        """gather_sequence, started: (the whole, valid once work.wait() returned; work)."""
        by_sequence = shard.movedim(SEQUENCE_DIM, 0).contiguous()  # the flat collectives cut dim 0
        whole = by_sequence.new_empty((by_sequence.size(0) * self.size, *by_sequence.shape[1:]))
        self.bytes["all_gather"] += whole.numel() * whole.element_size()
        if self._ring():
            whole.chunk(self.size)[self.rank].copy_(by_sequence)
            work = RingAllGather(whole.view(-1), self.group, self.rank, self.size)  # rings cut flat buffers
        elif torch.compiler.is_compiling():  # traced: synchronous, as torch.compile takes it
            getattr(dist, ALL_GATHER)(whole, by_sequence, group=self.group)
            work = DONE
        else:
            work = getattr(dist, ALL_GATHER)(whole, by_sequence, group=self.group, async_op=True)
        return whole.movedim(0, SEQUENCE_DIM), work

    def reduce_scatter_sequence(self, whole: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of [B, T, d], this rank's part of the sequence: [B, T / size, d].
        `whole` may be overwritten (the ring sums into it)."""
        self.bytes["reduce_scatter"] += whole.numel() * whole.element_size()
        length = whole.size(SEQUENCE_DIM) // self.size
        if self.by_ring and torch.compiler.is_compiling():  # gloo, traced: summed in place, this rank's part kept
            dist.all_reduce(whole, group=self.group)
            return whole.narrow(SEQUENCE_DIM, self.rank * length, length).contiguous()
        by_sequence = whole.movedim(SEQUENCE_DIM, 0).contiguous()
        if self._ring():
            received = torch.empty(by_sequence.numel() // self.size, dtype=whole.dtype, device=whole.device)
            RingReduceScatter(by_sequence.view(-1), self.group, self.rank, self.size, received, average=False).wait()
            # a copy: a view would keep the whole buffer (the other ranks' partial sums) alive
            part = by_sequence.chunk(self.size)[self.rank].clone()
        else:
            part = by_sequence.new_empty((length, *by_sequence.shape[1:]))
            getattr(dist, REDUCE_SCATTER)(part, by_sequence, group=self.group)
        return part.movedim(0, SEQUENCE_DIM)

    def _ring(self) -> bool:
        """The rings are eager Python (ring.py): under torch.compile torch's own collectives,
        which it traces."""
        return self.by_ring and not torch.compiler.is_compiling()

    def sequence_part(self, length: int) -> slice:
        """This rank's positions of a sequence of `length` under sequence parallelism."""
        if length % self.size:
            raise ValueError(f"a sequence of {length} tokens does not split over {self.size} tensor-parallel ranks: "
                             f"with parallel.sequence_parallel every sequence's length must be a multiple of {self.size}")
        part = length // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def take_bytes(self) -> dict[str, int]:
        """Bytes moved since the last call, per kind (all_reduce, all_gather, reduce_scatter; the
        column-parallel layers' backward re-gather counts as all_gather, as Megatron counts it)."""
        counted, self.bytes = dict(self.bytes), defaultdict(int)
        return counted


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.all_reduce(grad.clone(memory_format=torch.contiguous_format)), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.mark_dirty(x)  # summed in place: x is a layer's fresh partial output
        return tp.all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, tp):
        ctx.tp = tp
        return tp.gather_sequence(shard)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.reduce_scatter_sequence(grad.clone(memory_format=torch.contiguous_format)), None


class _ReduceScatterSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, whole, tp):
        # `whole` is a layer's fresh partial output that nothing saved for backward (a
        # matmul's, or the embedding's masked rows), so it may be summed in place.
        ctx.tp = tp
        return tp.reduce_scatter_sequence(whole)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.gather_sequence(grad), None


def copy_to_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _CopyToTP.apply(x, tp)


def reduce_from_tp(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _ReduceFromTP.apply(x, tp)


def gather_sequence(shard: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _GatherSequence.apply(shard, tp)


def reduce_scatter_sequence(whole: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _ReduceScatterSequence.apply(whole, tp)


def into_tp_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Before a column-parallel layer: the whole input on every rank."""
    return gather_sequence(x, tp) if tp.sequence_parallel else copy_to_tp(x, tp)


def out_of_tp_region(partial: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """After a row-parallel layer: the sum of the ranks' partial outputs, whole or (sequence
    parallel) this rank's part of the sequence."""
    return reduce_scatter_sequence(partial, tp) if tp.sequence_parallel else reduce_from_tp(partial, tp)
