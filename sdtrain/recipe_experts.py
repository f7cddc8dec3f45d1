"""Where expert parallelism fits: expert_parallel divides the experts and, once the world
size is known, the data-parallel size (expert groups are carved out of data-parallel ranks).

Every command that knows the world size (launch, estimate --gpus, recipe show with an
integer launch.nproc_per_node, preflight --recipe) runs check_expert_layout with it, so
each suggests only values that pass every check, in the same words.
"""

from __future__ import annotations

from math import gcd

from sdtrain.divisors import divisors
from sdtrain.errors import RecipeError
from sdtrain.parallel.layout import Layout

# Validation context: the caller checks the expert layout itself once it knows the world
# size (check_expert_layout), so that the values suggested fit the data-parallel size too.
LAYOUT_CHECKED_AT_LAUNCH = "expert_layout_checked_at_launch"


def expert_layout_problem(num_experts: int, ep: int, world: int | None = None, stages: int = 1,
                          tp: int = 1) -> str | None:
    """Why expert_parallel `ep` cannot split `num_experts` experts (over `world` ranks in
    `stages` pipeline stages of `tp` tensor-parallel ranks, where known), with only the values
    that pass every check; None if it can."""
    dense = Layout.if_fits(world, stages, tp)  # None: the world is unknown, or the stages' check speaks
    dp = dense.dp if dense is not None else None
    fits = divisors(num_experts if dp is None else gcd(num_experts, dp))  # those of both: of their gcd
    if num_experts % ep:
        also = f" (those that also divide the data-parallel size {dp})" if dp is not None else ""
        return (f"model.moe.num_experts {num_experts} is not divisible by parallel.expert_parallel {ep}: each rank "
                f"holds the same number of experts; use expert_parallel in {fits}{also}")
    if dp is not None and dp % ep:
        return (f"parallel.expert_parallel {ep} does not divide the data-parallel size {dp} ({dense.dp_formula()}): "
                f"expert groups are carved out of data-parallel ranks; use expert_parallel in {fits} "
                f"(values that divide both {dp} and model.moe.num_experts {num_experts})")
    return None


def check_expert_layout(recipe, world: int | None) -> None:
    """RecipeError unless expert_parallel divides the experts and, with `world` known, the
    data-parallel size. For a recipe loaded with layout_checked_at_launch=True."""
    if recipe.model.moe.num_experts:
        problem = expert_layout_problem(recipe.model.moe.num_experts, recipe.parallel.expert_parallel, world,
                                        recipe.parallel.pipeline.stages, recipe.parallel.tensor_parallel)
        if problem:
            raise RecipeError(problem)
