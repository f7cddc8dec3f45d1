"""One collective on known inputs, and the exact output it must produce.

Each rank's input is a pattern of small integers in float32 that depends on the rank (and,
for all_to_all, on the destination): sums of them are exact, so every result is compared
bit for bit, not within a tolerance. A wrong chunk order, a missing rank or a short
transfer all show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from sdtrain.parallel.comm import ALL_GATHER, REDUCE_SCATTER

RANK_STEP = 100.0  # rank r adds r * RANK_STEP to the pattern
DEST_STEP = 10_000.0  # all_to_all: the chunk for rank j adds j * DEST_STEP
PERIOD = 97  # the pattern repeats: values stay far below 2^24, where float32 stops being exact


@dataclass
class Case:
    op: str
    fresh: Callable[[], None]  # put the inputs back (in-place ops overwrite them)
    run: Callable[[], None]  # the collective, once, synchronously
    out: torch.Tensor
    expected: torch.Tensor

    def correct(self) -> bool:
        return torch.equal(self.out, self.expected)


def pattern(count: int, offset: float, device) -> torch.Tensor:
    return (torch.arange(count, device=device, dtype=torch.int64) % PERIOD).to(torch.float32) + offset


def make_case(op: str, elements: int, rank: int, world: int, device) -> Case:
    """Buffers for `op` on `elements` float32 values per rank (a multiple of world)."""
    chunk = elements // world
    builders = {"all_reduce": _all_reduce, "all_gather": _all_gather, "reduce_scatter": _reduce_scatter,
                "all_to_all": _all_to_all, "broadcast": _broadcast, "send_recv": _send_recv}
    return builders[op](elements, chunk, rank, world, device)


def _ranks_sum(world: int) -> float:
    return RANK_STEP * world * (world - 1) / 2


def _all_reduce(n, chunk, rank, world, device) -> Case:
    data = pattern(n, rank * RANK_STEP, device)
    source = data.clone()
    expected = pattern(n, 0.0, device) * world + _ranks_sum(world)
    return Case("all_reduce", lambda: data.copy_(source), lambda: dist.all_reduce(data), data, expected)


def _all_gather(n, chunk, rank, world, device) -> Case:
    mine = pattern(chunk, rank * RANK_STEP, device)
    out = torch.empty(n, device=device)
    expected = torch.cat([pattern(chunk, r * RANK_STEP, device) for r in range(world)])
    return Case("all_gather", lambda: out.fill_(-1), lambda: getattr(dist, ALL_GATHER)(out, mine), out, expected)


def _reduce_scatter(n, chunk, rank, world, device) -> Case:
    full = pattern(n, rank * RANK_STEP, device)
    out = torch.empty(chunk, device=device)
    expected = (pattern(n, 0.0, device) * world + _ranks_sum(world))[rank * chunk:(rank + 1) * chunk]
    # On gloo, torch runs this as an all-reduce of a copy (gloo has no reduce-scatter): that
    # is what a gloo job gets, so that is what is measured.
    run = lambda: getattr(dist, REDUCE_SCATTER)(out, full)  # noqa: E731
    return Case("reduce_scatter", lambda: out.fill_(-1), run, out, expected)


def _all_to_all(n, chunk, rank, world, device) -> Case:
    send = torch.cat([pattern(chunk, rank * RANK_STEP + dest * DEST_STEP, device) for dest in range(world)])
    out = torch.empty(n, device=device)
    expected = torch.cat([pattern(chunk, src * RANK_STEP + rank * DEST_STEP, device) for src in range(world)])
    return Case("all_to_all", lambda: out.fill_(-1), lambda: dist.all_to_all_single(out, send), out, expected)


def _broadcast(n, chunk, rank, world, device) -> Case:
    data = torch.empty(n, device=device)
    source = pattern(n, 0.0, device)

    def fresh():
        data.copy_(source) if rank == 0 else data.fill_(-1)

    return Case("broadcast", fresh, lambda: dist.broadcast(data, src=0), data, source)


def _send_recv(n, chunk, rank, world, device) -> Case:
    """Every rank sends to the next and receives from the previous, at once (nccl-tests' sendrecv)."""
    send = pattern(n, rank * RANK_STEP, device)
    out = torch.empty(n, device=device)
    peer_to, peer_from = (rank + 1) % world, (rank - 1) % world

    def run():
        ops = [dist.P2POp(dist.isend, send, peer_to), dist.P2POp(dist.irecv, out, peer_from)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return Case("send_recv", lambda: out.fill_(-1), run, out, pattern(n, peer_from * RANK_STEP, device))
