"""Where each parameter lives across the ranks, said once by `parallelize` and read by
everything that must treat parameters differently: which group averages a gradient (and
which ZeRO shards it), how it counts in the global gradient norm, and where a rank's piece
sits in the whole tensor a checkpoint or an export holds. Nothing tells parameters apart by
their names any more: a parameter is what its placement says.

Placements are keyed by the parameter's base name (`strategy.base_name`): a name survives
every wrapper (DDP, activation checkpointing, compile) and ZeRO's replacement of meta
parameters by real ones, where the Parameter object, or an attribute set on it, does not
survive the replacement; and the name is already the key of checkpoints and exports.

A placement has two parts:
- `replicated_over`: the data-parallel group whose ranks hold the same values and average
  the gradient: "dp" for dense weights, "edp" for experts (the ranks holding the same ones).
  ZeRO shards a parameter over that group.
- `shards`: the axes whose ranks hold different pieces of the whole tensor, each cut along
  one dimension: experts over "ep" along the expert index; (with tensor parallelism) a
  weight over "tp" along a dimension, possibly in equal pieces (a fused q/k/v). None: the
  parameter is whole on every rank of those axes (replicated over tp, say).
The global gradient norm follows from it: a parameter's squares are summed over the ranks
of every axis it is sharded over (each piece once), and one replicated there counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class AxisShard:
    """This rank's piece of a tensor cut along `dim` over the ranks of `axis`: the whole
    tensor is `whole` long there, and this rank's piece starts at index `start`. `pieces` > 1:
    the dimension is k equal parts (q, k and v fused) and each part is cut over the axis: the
    rank holds `part` indices of each, from `start` within it, one part after the other."""

    axis: str  # "ep" or "tp"
    dim: int
    whole: int
    start: int
    pieces: int = 1
    part: int = 0  # where pieces > 1: this rank's length of each part along dim (whole / pieces / ranks)


@dataclass(frozen=True)
class Placement:
    replicated_over: str = "dp"  # "dp" | "edp"
    shards: tuple[AxisShard, ...] = ()

    @property
    def sharded_over(self) -> tuple[str, ...]:
        """The axes over which this parameter's squares are summed in the global norm."""
        return tuple(s.axis for s in self.shards)

    @property
    def reduction(self) -> tuple[str, tuple[str, ...]]:
        """Parameters with the same reduction can share a flat buffer: one averaging group,
        and one sum over the same axes in the norm."""
        return self.replicated_over, self.sharded_over

    def whole_shape(self, local: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(local)
        for s in self.shards:
            shape[s.dim] = s.whole
        return tuple(shape)

    def whole_offset(self, local: tuple[int, ...]) -> tuple[int, ...]:
        """Where the element at `local` offsets in this rank's piece sits in the whole tensor.
        Along a dimension cut in k parts (q, k, v), the piece is the rank's slice of each part
        in turn: an offset in the piece's j-th part lands in the whole's j-th part."""
        offset = list(local)
        for s in self.shards:
            part, within = divmod(offset[s.dim], s.part) if s.pieces > 1 else (0, offset[s.dim])
            offset[s.dim] = part * (s.whole // s.pieces) + s.start + within
        return tuple(offset)

    def whole_boxes(self, local: tuple[int, ...], size: tuple[int, ...]) -> list[tuple[tuple, tuple, tuple]]:
        """A box of this rank's piece (offsets `local`, sizes `size`) as boxes of the whole
        tensor, each (offset in the whole, offset within the given box, sizes): one box, but
        where a dimension is cut in k parts a box crossing a part's end is contiguous in the
        piece and not in the whole, and is cut there."""
        out = [(tuple(local), (0,) * len(local), tuple(size))]
        for s in self.shards:
            if s.pieces == 1:
                continue
            cut = []
            for at, inner, sizes in out:
                lo, hi = at[s.dim], at[s.dim] + sizes[s.dim]
                while lo < hi:
                    end = min(hi, (lo // s.part + 1) * s.part)
                    cut.append((_with(at, s.dim, lo), _with(inner, s.dim, inner[s.dim] + lo - at[s.dim]),
                                _with(sizes, s.dim, end - lo)))
                    lo = end
            out = cut
        return [(self.whole_offset(at), inner, sizes) for at, inner, sizes in out]


def _with(values: tuple, dim: int, value: int) -> tuple:
    return (*values[:dim], value, *values[dim + 1:])


DENSE = Placement()  # whole on every data-parallel rank (and every tp rank)


def expert_placement(num_experts: int, first: int) -> Placement:
    """A layer's experts under expert parallelism: this rank holds experts first.. of the
    layer's num_experts along dimension 0; the ranks holding the same ones are its edp group."""
    return Placement("edp", (AxisShard("ep", 0, num_experts, first),))


Placements = dict[str, Placement]  # base name -> placement, for every parameter of the model


def axis_groups(env) -> dict[str, object]:
    """The process group of each axis a placement names, on this rank."""
    return {"dp": env.dp_group, "edp": env.edp_group, "ep": env.ep_group, "tp": env.tp_group}


def axis_sizes(env) -> dict[str, int]:
    return {"dp": env.dp_size, "edp": env.edp_size, "ep": env.ep_size, "tp": env.tp_size}


def squares_over_axes(partial: list[tuple[tuple[str, ...], torch.Tensor]], groups: dict[str, object]) -> torch.Tensor:
    """The sum of squares of every weight, each once, from partial sums per set of axes: the
    squares of weights sharded over some axes summed over those axes' groups, then all added
    in the order given (unsharded first: the sum it always was)."""
    total = None
    for axes, squares in partial:
        for axis in axes:
            dist.all_reduce(squares, group=groups[axis])
        total = squares if total is None else total + squares
    return total
