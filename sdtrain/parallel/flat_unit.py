"""A FlatUnit: a group of parameters laid end to end in one flat buffer, sharded evenly.

The buffer is padded to a multiple of the data-parallel size N; rank r owns elements
[r*S, (r+1)*S), S = padded / N. Parameters become views into the full buffer, so a single
all-gather restores all of them and a single reduce-scatter shards all their gradients:
no per-parameter collectives. Matrices come first and vectors after, so the rank's shard
splits into at most two runs, one with weight decay and one without.

For checkpoints, a rank's shard of a parameter is a flat range, which is cut into boxes
(for a matrix at most three: partial first row, whole rows, partial last row; a 3-D expert
weight likewise along its first axis); those boxes are the local shards of a DTensor keyed
by the parameter's name, which is what lets DCP load it on any other world size or ZeRO
stage. A parameter that is itself a piece of a larger tensor (a slice of a layer's experts
under expert parallelism) says so in its placement: its boxes are placed in the whole
tensor (the layer's [E, ...]) at the piece's start; a tensor-parallel piece likewise (a
fused q/k/v piece holds a slice of each of q, k and v: a box crossing from one to the next is
cut there, Placement.whole_boxes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

from sdtrain.parallel.placement import DENSE, Placement


@dataclass(frozen=True)
class Entry:
    name: str
    param: nn.Parameter
    offset: int  # in the full flat buffer
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class FlatUnit:
    """`initial_value(name, out)` makes the first value of a parameter that is still on the
    meta device, straight into its place in the buffer; such a parameter is replaced by a
    real one (see `replaced`), since a meta tensor cannot take real data in place.
    `placements`: by name, those of parameters that are pieces of larger tensors (the rest
    are whole)."""

    def __init__(self, name: str, named_params: list[tuple[str, nn.Parameter]], world: int, rank: int,
                 dtype: torch.dtype, device: torch.device,
                 initial_value: Callable[[str, torch.Tensor], None] | None = None,
                 placements: dict[str, Placement] | None = None):
        self.name, self.world, self.rank = name, world, rank
        self.placements = placements or {}
        ordered = sorted(named_params, key=lambda item: item[1].dim() < 2)  # stable: matrices first
        layout, offset = [], 0
        for fqn, param in ordered:
            layout.append((fqn, param, offset))
            offset += param.numel()
        self.numel = offset
        self.shard_size = -(-self.numel // world)  # ceil
        self.padded = self.shard_size * world
        self.full = torch.zeros(self.padded, dtype=dtype, device=device)
        self.entries: list[Entry] = []
        self.replaced: dict[nn.Parameter, nn.Parameter] = {}  # meta parameter -> real one
        with torch.no_grad():
            for fqn, param, offset in layout:
                place = self.full[offset : offset + param.numel()].view(param.shape)
                if param.is_meta:
                    if initial_value is None:
                        raise ValueError(f"{fqn} is on the meta device and nothing makes its first value")
                    initial_value(fqn, place)
                    # An empty parameter, pointed at its place by bind_params: `.data` keeps the
                    # parameter's own version counter, which the collectives writing into the
                    # buffer must not bump (autograd would call its saved weights modified).
                    real = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=param.requires_grad)
                    self.replaced[param] = param = real
                else:
                    place.copy_(param.detach())
                self.entries.append(Entry(fqn, param, offset, place.shape))
        self.decay_numel = sum(e.numel for e in self.entries if len(e.shape) >= 2)
        self.bind_params()

    @property
    def params(self) -> list[nn.Parameter]:
        return [e.param for e in self.entries]

    @property
    def shard_start(self) -> int:
        return self.rank * self.shard_size

    def own_slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full-size flat tensor (a view)."""
        return tensor[self.shard_start : self.shard_start + self.shard_size]

    def bind_params(self) -> None:
        """Point every parameter at its place in the full buffer."""
        for e in self.entries:
            e.param.data = self.full[e.offset : e.offset + e.numel].view(e.shape)

    def decay_split(self) -> tuple[slice, slice]:
        """The parts of this rank's shard with and without weight decay."""
        boundary = min(max(self.decay_numel - self.shard_start, 0), self.shard_size)
        return slice(0, boundary), slice(boundary, self.shard_size)

    # --- checkpoints -----------------------------------------------------------------

    def sharded(self, local: torch.Tensor, mesh: DeviceMesh) -> dict[str, DTensor]:
        """Each parameter's part of `local` (a tensor laid out like this rank's shard) as a
        DTensor of the parameter's whole shape (a piece's, as its placement says, the whole
        tensor's), for DCP to save or load in place; a parameter this rank holds none of is
        left out (the ranks that hold it save and load it).

        A rank's part of a parameter is a few boxes at arbitrary offsets, which no DTensor
        placement describes (Shard(0) cuts whole rows, in torch.chunk's sizes). So the local
        tensor is a LocalShardsWrapper: DCP takes each box and its offset from it and does
        not read the placement (torchrec's row-wise tables go the same way). It replaces
        ShardedTensor, which torch deprecates with a FutureWarning in every rank's log on
        every resume; the files hold the same chunks, so older checkpoints still load."""
        out = {}
        for e in self.entries:
            pieces = self._pieces(e, self.rank)
            if not pieces:
                continue
            placement = self.placements.get(e.name, DENSE)
            shape = torch.Size(placement.whole_shape(tuple(e.shape)))
            local_boxes, offsets = [], []
            for off, size, start in pieces:
                box = local[start : start + math.prod(size)].view(size)
                # (a box of a fused q/k/v piece crossing q's or k's end is two boxes of the whole)
                for whole_offset, within, sizes in placement.whole_boxes(off, size):
                    local_boxes.append(_narrowed(box, within, sizes))
                    offsets.append(whole_offset)
            wrapper = LocalShardsWrapper(local_boxes, offsets)
            # Made directly rather than by DTensor.from_local, which views the wrapper as a
            # whole, and the wrapper views several boxes of a 3-D expert weight as none.
            meta = TensorMeta(shape, torch.empty(shape, device="meta").stride(), local.dtype)
            out[e.name] = DTensor(wrapper, DTensorSpec(mesh, (Shard(0),), tensor_meta=meta), requires_grad=False)
        return out

    def _pieces(self, e: Entry, rank: int):
        """Boxes (offsets, sizes, start in the rank's shard) of e owned by `rank`."""
        lo = max(e.offset, rank * self.shard_size)
        hi = min(e.offset + e.numel, (rank + 1) * self.shard_size)
        if lo >= hi:
            return []
        base = lo - rank * self.shard_size
        return [(off, size, base + start) for off, size, start in boxes(tuple(e.shape), lo - e.offset, hi - e.offset)]


def _narrowed(box: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    """The part of `box` at `offsets` of `sizes` (a view: DCP loads into it in place)."""
    for dim, (at, size) in enumerate(zip(offsets, sizes)):
        if at or size != box.size(dim):
            box = box.narrow(dim, at, size)
    return box


def boxes(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[tuple, tuple, int]]:
    """The flat range [lo, hi) of a row-major tensor of `shape` as boxes (offsets, sizes,
    start relative to lo): whole slices along the first axis where the range covers them,
    and the partial slices at either end cut the same way one axis down."""
    if len(shape) == 1:
        return [((lo,), (hi - lo,), 0)]
    inner = math.prod(shape[1:])
    out, pos = [], lo
    while pos < hi:
        row, within = divmod(pos, inner)
        if within == 0 and hi - pos >= inner:
            rows = (hi - pos) // inner
            out.append(((row, *(0,) * (len(shape) - 1)), (rows, *shape[1:]), pos - lo))
            pos += rows * inner
        else:
            end = min(hi, (row + 1) * inner)
            for off, size, start in boxes(shape[1:], within, end - row * inner):
                out.append(((row, *off), (1, *size), pos - lo + start))
            pos = end
    return out


def replace_parameters(model: nn.Module, replaced: dict[nn.Parameter, nn.Parameter]) -> None:
    """Swap parameters everywhere `model` holds them (a tied weight sits in two modules)."""
    if not replaced:
        return
    for module in model.modules():
        for key, param in module._parameters.items():
            if param in replaced:
                module._parameters[key] = replaced[param]
