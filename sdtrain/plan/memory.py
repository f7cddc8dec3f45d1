"""A layout's memory per rank: the estimate's (sdtrain/estimate), through the layout's own
recipe, so the planner has no memory model of its own; offload (where it lives: device, host,
disk) is the estimate's too.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.estimate.plan import effective_offload, estimate_shape, expert_slots, in_flight, offload_notes, rank_shapes
from sdtrain.estimate.terms import Estimate


@dataclass(frozen=True)
class Memory:
    device_bytes: float  # the largest rank's peak as the fit check counts it (a CPU rank: the whole process)
    host_bytes: float  # offload's host memory per rank (on a CPU rank, within device_bytes)
    disk_bytes: float  # offload's NVMe files per rank
    estimate: Estimate  # the largest rank's, term by term
    shapes: list  # (where, RankShape) of each pipeline stage: the time model reads them too


def axes_key(candidate) -> tuple:
    """What rank_shapes' per-layer sums depend on: the axes that cut the model."""
    return (candidate.pp, candidate.tp, candidate.ep, candidate.schedule, candidate.virtual_stages)


def reshaped(shapes: list, recipe, device: str) -> list:
    """Shapes made by rank_shapes for a recipe of the same axes (axes_key), at this recipe's ZeRO
    stage, offload, checkpointing, micro-batch and accumulation: the only fields those change (a
    test holds this to rank_shapes itself on every layout of a small model). rank_shapes' per-layer
    sums take milliseconds at 96 layers; made once per axes, 2,000 GPUs' layouts take seconds."""
    train, parallel = recipe.train, recipe.parallel
    M, mb = train.grad_accum_steps, train.micro_batch_size
    optimizer, params = effective_offload(parallel.zero, device)
    return [(where, shape.but(micro_batch=mb, grad_accum=M, in_flight=in_flight(parallel.pipeline, stage, M),
                              expert_slots=expert_slots(recipe.model, mb * recipe.model.seq_len),
                              zero_stage=parallel.zero_stage, checkpointing=train.activation_checkpointing,
                              offload_optimizer=optimizer, offload_params=params))
            for stage, (where, shape) in enumerate(shapes)]


def layout_memory(recipe, world: int, device: str, axes_shapes: list | None = None) -> Memory:
    """The estimate of a layout's recipe; `axes_shapes`: rank_shapes of a recipe of the same axes."""
    shapes = rank_shapes(recipe, world, device) if axes_shapes is None else reshaped(axes_shapes, recipe, device)
    notes = offload_notes(recipe, device)
    largest = max((estimate_shape(shape, where, notes) for where, shape in shapes), key=lambda e: e.total)
    return Memory(largest.total, largest.host_total, largest.disk_total, largest, shapes)
