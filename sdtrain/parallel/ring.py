"""An all-gather on gloo made of point-to-point exchanges around a ring.

gloo's own all-gather is slow on CPU: on the 2-core VM, gathering 84 MiB over 2 ranks took
140-210 ms, about twice an all-reduce of the same buffer (which moves twice the bytes),
while the same gather as one send and one receive per rank took 43-54 ms. ZeRO gathers the
whole model once per step (stages 1 and 2) or twice per block (stage 3), so this was most
of what ZeRO's step cost over DDP's. A ring of N - 1 steps, each passing the chunk received
last to the next rank, moves the (N - 1)/N of the buffer an all-gather must, and it only
copies: the result is bitwise the one gloo's all-gather gives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingAllGather:
    """full <- every rank's chunk of it, each rank's own chunk already in place. The first
    step is issued at once, so that with 2 ranks (one step) the whole gather overlaps
    whatever runs until wait(); each further step is issued when the previous one is
    waited for."""

    def __init__(self, full: torch.Tensor, group, rank: int, world: int):
        self.chunks = full.chunk(world)
        self.group, self.rank, self.world = group, rank, world
        self.send_to = dist.get_global_rank(group, (rank + 1) % world)
        self.receive_from = dist.get_global_rank(group, (rank - 1) % world)
        self.next_step = 0
        self.works = self._issue()

    def _issue(self) -> list:
        """Step s: pass on chunk rank - s (this rank's own, then the ones received), receive
        chunk rank - s - 1 from the left."""
        if self.next_step >= self.world - 1:
            return []
        s, self.next_step = self.next_step, self.next_step + 1
        received = dist.irecv(self.chunks[(self.rank - s - 1) % self.world], self.receive_from, group=self.group)
        sent = dist.isend(self.chunks[(self.rank - s) % self.world], self.send_to, group=self.group)
        return [received, sent]

    def wait(self) -> bool:
        while self.works:
            for work in self.works:
                work.wait()
            self.works = self._issue()
        return True
