"""A recipe as `launch` would resolve it for a world size, for `sdtrain estimate` and
`sdtrain preflight --recipe`."""

from __future__ import annotations

from sdtrain.batch import derive_batch
from sdtrain.estimate.plan import estimate_recipe
from sdtrain.estimate.terms import Estimate
from sdtrain.model.size import count_params
from sdtrain.parallel.layout import Layout
from sdtrain.recipe import Recipe, check_expert_layout, load_recipe


def resolved_recipe(path: str, overrides: list[str], ranks: int) -> Recipe:
    """The recipe with its micro-batch and accumulation derived for `ranks` workers; its expert
    layout checked for them as launch checks it (no estimate of a layout that cannot launch)."""
    recipe = load_recipe(path, overrides, layout_checked_at_launch=True)
    check_expert_layout(recipe, ranks)
    train = recipe.train
    layout = Layout.of(recipe, ranks)  # a pipeline the ranks do not split is refused as launch refuses it
    batch = derive_batch(train.global_batch_size, train.micro_batch_size, train.grad_accum_steps, layout.dp)
    resolved = recipe.model_copy(deep=True)
    resolved.train.micro_batch_size, resolved.train.grad_accum_steps = batch.micro_batch, batch.grad_accum
    return resolved


def recipe_estimates(path: str, overrides: list[str], ranks: int | None,
                     device: str | None) -> tuple[int, int, str, list[Estimate]]:
    """(parameters, ranks, device, one estimate per kind of rank)."""
    if ranks is None:
        nproc = load_recipe(path, overrides, layout_checked_at_launch=True).launch.nproc_per_node
        ranks = nproc if isinstance(nproc, int) else 1
    recipe = resolved_recipe(path, overrides, ranks)
    device = device or ("cuda" if recipe.launch.backend == "nccl" else "cpu")
    return count_params(recipe.model), ranks, device, estimate_recipe(recipe, ranks, device)
