"""Every layout of a recipe's model and global batch over `world` ranks, and why each one
that cannot run cannot: the recipe's own checks (heads, layers, experts, schedules), the
layout's (`Layout`), the batch arithmetic, and tp kept inside a node.

The axes: pp x tp x dp = world (every split), ep dividing dp (with experts), ZeRO stage 0-3
(1-3 at dp 1 only with offload: ZeRO shards over dp, so without offload they would be stage 0
with extra buffers, measured 3-10% slower and up to 1.7x the peak memory on the 2-core VM; and at
dp 1 with offload only stage 1, which offloads the same optimizer state as 2 and 3 without their
churn: measured 2-7% faster than stage 2, and stage 3's gathered blocks grew the heap to 1.32x its
predicted peak for the 4x model under tp 2 (stage 3 stays where the recipe offloads its weights)), the
optimizer state beside the model or on NVMe (ZeRO 1-3), activation checkpointing off and
on, the pipeline schedule (pp > 1: 1f1b, gpipe, interleaved with two chunks per rank, zero
bubble), and every micro-batch whose accumulation makes the global batch. A structure (all
but the micro-batch) is validated once as a recipe, so thousands of layouts take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from pydantic import ValidationError

from sdtrain.divisors import divisors
from sdtrain.errors import RecipeError
from sdtrain.parallel.layout import Layout
from sdtrain.parallel.partition import check_schedule
from sdtrain.plan.candidate import Candidate
from sdtrain.recipe_experts import LAYOUT_CHECKED_AT_LAUNCH, check_expert_layout

INTERLEAVED_CHUNKS = 2  # virtual stages tried for the interleaved schedule


@dataclass
class Option:
    """One layout, with the recipe that runs it (None where it cannot run, and why)."""

    candidate: Candidate
    recipe: object | None
    reason: str = ""


def structures(world: int, moe: bool) -> Iterator[dict]:
    for pp in divisors(world):
        for tp in divisors(world // pp):
            dp = world // (pp * tp)
            for ep in (divisors(dp) if moe else [1]):
                for zero in range(4):
                    for offload in ("none", "nvme") if zero else ("none",):
                        for ac in (False, True):
                            schedules = [("none", 1)] if pp == 1 else \
                                [("1f1b", 1), ("gpipe", 1), ("interleaved", INTERLEAVED_CHUNKS), ("zero_bubble", 1)]
                            for schedule, virtual in schedules:
                                yield dict(pp=pp, tp=tp, dp=dp, ep=ep, zero_stage=zero, offload=offload,
                                           activation_checkpointing=ac, schedule=schedule, virtual_stages=virtual)


def structure_recipe(base_raw: dict, s: dict, global_batch: int, world: int):
    """The recipe of a structure, validated as `launch` validates it; RecipeError says why not."""
    from sdtrain.recipe_load import validate_recipe

    raw = {**base_raw, "train": dict(base_raw["train"]), "parallel": dict(base_raw["parallel"])}
    raw["train"].update(activation_checkpointing=s["activation_checkpointing"], global_batch_size=global_batch,
                        micro_batch_size=None, grad_accum_steps=None)
    parallel = raw["parallel"]
    parallel.update(zero_stage=s["zero_stage"], tensor_parallel=s["tp"], expert_parallel=s["ep"], sequence_parallel=None)
    parallel["zero"] = {**parallel["zero"], "offload_optimizer": s["offload"]}
    if s["zero_stage"] != 3:
        parallel["zero"]["offload_params"] = "none"
    pipeline = {**parallel["pipeline"], "stages": s["pp"], "virtual_stages": s["virtual_stages"],
                "schedule": "1f1b" if s["schedule"] == "none" else s["schedule"]}
    if s["schedule"] == "interleaved" or isinstance(pipeline.get("partition"), list):
        pipeline["partition"] = "uniform"
    parallel["pipeline"] = pipeline
    recipe = validate_recipe(raw, source="the layout", context={LAYOUT_CHECKED_AT_LAUNCH: True})
    check_expert_layout(recipe, world)
    Layout.of(recipe, world)
    return recipe


def reason_of(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, ValidationError):
        text = "; ".join(e["msg"] for e in exc.errors())
    return text.removeprefix("Value error, ").replace("the layout: ", "")


def enumerate_layouts(base, world: int, global_batch: int, per_node: int) -> Iterator[Option]:
    """Every layout, in a fixed order; each with its recipe (micro-batch and accumulation set),
    or the reason it cannot run."""
    base_raw = base.model_dump(mode="json")
    moe = bool(base.model.moe.num_experts)
    params_offloaded = base.parallel.zero.offload_params != "none"  # the recipe's own: stage 3's weights off too
    for s in structures(world, moe):
        dp = s["dp"]
        micro_batches = divisors(global_batch // dp) if global_batch % dp == 0 else [1]
        reason, recipe = "", None
        if s["tp"] > per_node:
            reason = f"tensor_parallel {s['tp']} spans nodes of {per_node}: its per-layer collectives need a node's links"
        elif dp == 1 and s["zero_stage"] and s["offload"] == "none":
            reason = (f"ZeRO stage {s['zero_stage']} shards over dp, which is 1 here: every state stays whole, as "
                      "at stage 0 (listed), with ZeRO's buffers and copies on top")
        elif dp == 1 and s["zero_stage"] > 1 and not (s["zero_stage"] == 3 and params_offloaded):
            reason = (f"ZeRO stage {s['zero_stage']} at dp 1 offloads the same optimizer state as stage 1 (listed), "
                      "with its bucket and gather churn on top")
        elif global_batch % dp:
            reason = f"dp {dp} does not divide the global batch {global_batch}"
        else:
            try:
                recipe = structure_recipe(base_raw, s, global_batch, world)
            except (RecipeError, ValidationError, ValueError) as exc:
                reason = reason_of(exc)
        for mb in micro_batches:
            accum = global_batch // (mb * dp) if not global_batch % dp else 0
            candidate = Candidate(s["pp"], s["tp"], dp, s["ep"], s["zero_stage"], s["offload"], mb, accum,
                                  s["activation_checkpointing"], s["schedule"], s["virtual_stages"])
            if recipe is None:
                yield Option(candidate, None, reason)
                continue
            try:
                check_schedule(recipe.parallel.pipeline, accum)
            except RecipeError as exc:
                yield Option(candidate, None, reason_of(exc))
                continue
            train = recipe.train.model_copy(update={"micro_batch_size": mb, "grad_accum_steps": accum})
            yield Option(candidate, recipe.model_copy(update={"train": train}))
