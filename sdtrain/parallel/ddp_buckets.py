"""Fix DDP's gradient buckets before step 1, so every attempt of a job averages alike.

DDP reduces its first backward in one bucket of every gradient and re-buckets from the
second backward on, in the order the gradients arrived. gloo's ring all-reduce adds the
ranks' copies of an element in an order that depends on where the element sits in its
bucket, so at 3+ ranks the same gradients averaged in the two layouts differ in the last
bits. A job restarted (or resumed) from step k then averaged step k+1 in the one-bucket
layout while the uninterrupted run had long re-bucketed: the trajectories parted by an ulp
and the logged loss and gradient norm showed it.

`settle_buckets` runs DDP's re-bucketing once, at construction, on a backward of zeros that
reaches every parameter in reverse registration order (the order a model built input to
output produces its gradients, so buckets still fill and go out while backward runs).
Every step of every attempt then reduces in the same buckets.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def settle_buckets(ddp: DistributedDataParallel, params: list[torch.Tensor]) -> None:
    """`params`: the ones DDP averages (its ignored parameters left out), in registration
    order. One all-reduce of zeros; gradients are left zero."""
    # The autograd engine runs the newest node first: the last parameter's gradient is
    # ready first, the first parameter's last.
    zero = torch.stack([(p * 0).sum() for p in params]).sum()
    ddp.reducer.prepare_for_backward([])  # what DDP's forward does before a synced backward
    zero.backward()
    # The re-bucketing itself: DDP's forward does this on the first forward after a backward.
    ddp.reducer._rebuild_buckets()
