"""How ZeRO lays parameters into sharded flat units (the optimizer over their shards:
zero_optimizer.py).

Stage 3: one unit per Transformer block, plus one for everything else (embeddings, final
norm), last, and one whole unit of the parameters under the persistence threshold. Stages
1/2: buckets of about reduce_bucket_mb, in reverse order of definition, which is roughly the
order backward produces gradients.

Under bf16 the model computes in bf16 weights and gradients while fp32 master shards take
the update, which gives the ZeRO paper's model-state bytes per rank with K = 12:
stage 1: 4Ψ + 12Ψ/N, stage 2: 2Ψ + 14Ψ/N, stage 3: 16Ψ/N. Under fp32 the weights are their
own master (K = 8): stage 1: 8Ψ + 8Ψ/N, stage 2: 4Ψ + 12Ψ/N, stage 3: 16Ψ/N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from sdtrain.parallel.comm import Comm
from sdtrain.parallel.flat_unit import FlatUnit, replace_parameters
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.placement import DENSE, Placements
from sdtrain.parallel.strategy import base_name
from sdtrain.parallel.zero_tp import placed_initial_value

if TYPE_CHECKING:
    from sdtrain.parallel.tensor_parallel import TensorParallelPlan


@dataclass
class ZeroUnits:
    """Every unit, in the order ZeRO walks them; at stage 3 also how they group: per block its
    dense unit, then e.g. its experts'; the root units; the persistent unit, if any."""
    units: list[FlatUnit]
    block_units: list[list[FlatUnit]] = field(default_factory=list)
    root_units: list[FlatUnit] = field(default_factory=list)
    persistent_unit: FlatUnit | None = None


def build_units(model: nn.Module, stage: int, cfg, placements: Placements, comms: dict[str, Comm],
                env: DistEnv, param_dtype: torch.dtype, tp_plan: TensorParallelPlan | None,
                adopt: Callable[[FlatUnit], None]) -> ZeroUnits:
    """The model's parameters laid into flat units (see the module's docstring), each sharded
    over comms[its placement's replicated_over], given its state by shard_state and handed
    to the optimizer (`adopt`, zero_optimizer.py) at once: an offloading one moves its
    master out before the next unit is made.

    Each unit is sharded as soon as it is made, so with a meta-device model (whose
    weights the units make) stage 3 never holds more than one unit whole: a model
    larger than one device's memory can start. A unit holds parameters of one placement's
    reduction only (experts under expert parallelism get units of their own, sharded over
    their edp group), so each unit has one group and counts one way in the norm."""
    named = [(base_name(n), p) for n, p in model.named_parameters()]
    initial_value = placed_initial_value(model, placements, env.tp_size)
    placement = {p: placements[n] for n, p in named}
    # Under sequence parallelism: parameters whose gradients are partial sums over tp,
    # kept in units of their own (zero_tp.py)
    partial_names = set(tp_plan.partial_grads) if tp_plan is not None else set()
    partial = {p for n, p in named if n in partial_names}

    def by_reduction(params: list) -> list[list]:
        """params split by their placements' reduction (and partial over tp or not), the
        dense ones first."""
        groups = {(DENSE.reduction, False): [], (DENSE.reduction, True): []}
        for n, p in params:
            groups.setdefault((placement[p].reduction, p in partial), []).append((n, p))
        return [group for group in groups.values() if group]

    def make(name: str, params: list) -> FlatUnit:
        placed = placement[params[0][1]]
        if any(placement[p].reduction != placed.reduction for _, p in params):
            raise ValueError(f"ZeRO unit {name} mixes parameters reduced over different groups")
        if len({p in partial for _, p in params}) > 1:
            raise ValueError(f"ZeRO unit {name} mixes gradients partial over tp with complete ones")
        comm = comms[placed.replicated_over]
        unit = FlatUnit(name, params, comm.world, comm.rank, torch.float32, env.device, initial_value,
                        {n: placement[p] for n, p in params})
        unit.comm, unit.reduction, unit.partial_over_tp = comm, placed.reduction, params[0][1] in partial
        unit.mesh = DeviceMesh.from_group(comm.group, env.device.type)  # the checkpoint's DTensors'
        replace_parameters(model, unit.replaced)
        shard_state(unit, stage, param_dtype, env.device)
        adopt(unit)
        return unit

    if stage == 3:
        # Parameters under the persistence threshold (norms, biases) stay whole in one
        # unit of their own: gathering them per block would cost more than it saves.
        # (dense ones only: experts are sharded over their own group, each ep rank's its own)
        persistent = [(n, p) for n, p in named
                      if p.numel() < cfg.persistence_threshold and placement[p].reduction == DENSE.reduction]
        kept = {p for _, p in persistent}
        block_units, in_blocks = [], set()  # per block: its dense unit, then e.g. its experts'
        for key, block in model.blocks.items():
            params = [(base_name(f"blocks.{key}.{n}"), p) for n, p in block.named_parameters() if p not in kept]
            in_blocks.update(p for _, p in params)
            block_units.append([make(f"blocks.{key}" + _suffix(placement[group[0][1]]), group)
                                for group in by_reduction(params)])
        rest = [(n, p) for n, p in named if p not in in_blocks and p not in kept]
        # (one per reduction: under tensor parallelism a vocabulary-parallel embedding beside a whole norm)
        root_units = [make("root" + _suffix(placement[group[0][1]]), group) for group in by_reduction(rest)]
        persistent_unit = make("persistent", persistent) if persistent else None
        units = [u for u in (*(u for block in block_units for u in block), *root_units, persistent_unit)
                 if u is not None]
        return ZeroUnits(units, block_units, root_units, persistent_unit)
    limit = cfg.reduce_bucket_mb * 2**20 / (torch.finfo(param_dtype).bits // 8)  # elements
    units = []
    for group in by_reduction(named):
        bucket, size = [], 0
        for name, p in reversed(group):
            bucket.append((name, p))
            size += p.numel()
            if size >= limit:
                units.append(make(f"bucket{len(units)}", bucket))
                bucket, size = [], 0
        if bucket:
            units.append(make(f"bucket{len(units)}", bucket))
    return ZeroUnits(units)


def shard_state(unit: FlatUnit, stage: int, param_dtype: torch.dtype, device: torch.device) -> None:
    """Give the unit its master shard, weights in the compute dtype, and gradient space."""
    separate_master = param_dtype != torch.float32
    unit.master = unit.own_slice(unit.full).clone() if separate_master else None
    unit.full = unit.full.to(param_dtype)
    if stage == 3:
        unit.shard = unit.own_slice(unit.full).clone()
        if unit.master is None:
            unit.master = unit.shard  # fp32: the shard is its own master
    elif unit.master is None:
        unit.master = unit.own_slice(unit.full)  # fp32 stage 1/2: update in place
    unit.bind_params()
    unit.grad_shard = torch.zeros(unit.shard_size, dtype=param_dtype, device=device)
    unit.grad_full = None
    unit.waiting = len(unit.entries)
    if stage == 1:  # whole gradients, accumulated in place across micro-batches
        unit.grad_full = torch.zeros(unit.padded, dtype=param_dtype, device=device)
        for e in unit.entries:
            e.param.grad = unit.grad_full[e.offset : e.offset + e.numel].view(e.shape)
    if stage == 3 and unit.name != "persistent":
        unit.full.untyped_storage().resize_(0)  # whole weights only while a block runs


def _suffix(placement) -> str:
    """A block's unit of parameters placed otherwise than dense is named after how: `.edp.ep`."""
    return "" if placement.reduction == DENSE.reduction else "." + ".".join((placement.replicated_over,
                                                                             *placement.sharded_over))
