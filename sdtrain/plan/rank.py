"""Every layout, its memory and step time, ranked: those that fit (with a stated margin
under each rank's memory) fastest first, then those that do not, each with its reason."""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.plan.candidate import Candidate
from sdtrain.estimate.plan import rank_shapes
from sdtrain.plan.cluster import GiB, Cluster
from sdtrain.plan.enumerate import enumerate_layouts
from sdtrain.plan.memory import Memory, axes_key, layout_memory
from sdtrain.plan.time_model import StepTime, step_time

DEFAULT_MARGIN = 0.10  # of each rank's memory, kept free: the estimate is within about 10-20% of measured
JSON_KEYS = ("pp", "tp", "dp", "ep", "zero_stage", "offload", "micro_batch_size", "grad_accum_steps",
             "activation_checkpointing", "schedule", "predicted_step_s", "predicted_tokens_per_s",
             "predicted_mem_gib", "fits", "reason")


@dataclass
class Planned:
    candidate: Candidate
    recipe: object | None
    memory: Memory | None = None
    time: StepTime | None = None
    fits: bool = False
    reason: str = ""

    @property
    def name(self) -> str:
        return self.candidate.name

    def as_dict(self) -> dict:
        row = self.candidate.as_dict()
        row.update(
            predicted_step_s=round(self.time.seconds, 6) if self.time else None,
            predicted_tokens_per_s=round(self.time.tokens_per_s, 1) if self.time else None,
            predicted_mem_gib=round(self.memory.device_bytes / GiB, 4) if self.memory else None,
            fits=self.fits, reason=self.reason)
        return {key: row[key] for key in JSON_KEYS}


def plan_layouts(recipe, cluster: Cluster, global_batch: int, margin: float = DEFAULT_MARGIN) -> list[Planned]:
    allowed = cluster.budget_bytes * (1 - margin)
    planned, shapes_of = [], {}  # the rank shapes of each cut of the model, made once (memory.reshaped)
    for option in enumerate_layouts(recipe, cluster.gpus, global_batch, cluster.per_node):
        row = Planned(option.candidate, option.recipe, reason=option.reason)
        if option.recipe is not None:
            axes = axes_key(option.candidate)
            if axes not in shapes_of:
                shapes_of[axes] = rank_shapes(option.recipe, cluster.gpus, cluster.device)
            row.memory = layout_memory(option.recipe, cluster.gpus, cluster.device, shapes_of[axes])
            row.time = step_time(option.candidate, option.recipe, row.memory, cluster)
            row.fits = row.memory.device_bytes <= allowed
            if not row.fits:
                row.reason = (f"does not fit: {row.memory.device_bytes / GiB:.2f} GiB per rank, over "
                              f"{allowed / GiB:.2f} GiB ({cluster.device_memory_gib:g} GiB less the {margin:.0%} margin)")
        planned.append(row)
    return ranked(planned)


def ranked(planned: list[Planned]) -> list[Planned]:
    """Fitting layouts by predicted tokens/s, fastest first (the smaller memory first where two
    tie); then the rest (priced ones first)."""
    def key(row: Planned):
        return (not row.fits, row.time is None, -round(row.time.tokens_per_s if row.time else 0.0, 6),
                row.memory.device_bytes if row.memory else 0.0)
    return sorted(planned, key=key)


def find(planned: list[Planned], name: str) -> Planned | None:
    return next((row for row in planned if row.name == name), None)
