"""What ZeRO does differently under tensor parallelism: each tp rank runs its own ZeRO over
the data-parallel replicas of its pieces (env.dp_group), and only two things cross tp.

- First values: a tp-sharded parameter of a meta-device model starts as its slice of the
  whole name-seeded tensor (tensor_parallel.initial_shard), every other one as the model
  makes it whole, so every tp size starts from the one-process weights.
- Partial gradients: under sequence parallelism the parameters whole on every tp rank saw
  only the rank's part of the sequence. ZeRO keeps them in units of their own (see
  zero_units.build_units), whose flat layout is then the same on every tp rank (the same
  parameters, shapes, order and dp size), so the dp-averaged shard of such a unit is summed
  over tp as it is: a sum that commutes with the average over dp.
The tp collectives' bytes are reported beside ZeRO's (tp_traffic.py), as DataParallel's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from sdtrain.parallel.placement import Placements
from sdtrain.parallel.tensor_parallel import TensorParallelPlan, initial_shard


def placed_initial_value(model: nn.Module, placements: Placements,
                         tp_size: int) -> Callable[[str, torch.Tensor], None] | None:
    """FlatUnit's `initial_value(name, out)`: this rank's tp piece where the parameter's
    placement cuts it over "tp", the model's own first value otherwise."""
    whole = getattr(model, "initial_value", None)
    if whole is None:
        return None

    def initial_value(name: str, out: torch.Tensor) -> None:
        tp_shard = next((s for s in placements[name].shards if s.axis == "tp"), None)
        if tp_shard is None:
            whole(name, out)
        else:
            initial_shard(model, name, out, tp_shard, tp_size)

    return initial_value


def sum_partial_shards(plan: TensorParallelPlan | None, shards: list[torch.Tensor]) -> None:
    """Sum these gradient shards (of the units holding partial gradients) over tp, in place,
    in one all-reduce counted with the plan's other gradient sums."""
    if plan is None or not shards:
        return
    flat = plan.tp.all_reduce(torch.cat(shards), kind="all_reduce_grads")
    for shard, part in zip(shards, flat.split([s.numel() for s in shards])):
        shard.copy_(part)
