"""A layout -> a recipe that launches as is: the user's recipe with the layout's axes, batch
split and schedule in place, validated again as `launch` will validate it."""

from __future__ import annotations

import os

import yaml

from sdtrain.errors import UserInputError, printable
from sdtrain.plan.cluster import Cluster
from sdtrain.plan.rank import Planned


def layout_recipe_text(row: Planned, cluster: Cluster, recipe_path: str) -> str:
    recipe = row.recipe.model_copy(deep=True)
    recipe.launch.nproc_per_node = cluster.per_node
    raw = recipe.model_dump(mode="json")
    if row.candidate.pp == 1:
        raw["parallel"]["pipeline"]["schedule"] = "1f1b"  # the default: nothing to order without stages
    from sdtrain.recipe_load import validate_recipe

    validate_recipe(raw, source="the planned recipe")  # what launch will check, checked here first
    header = (f"# Written by `sdtrain plan {recipe_path}` for {cluster.describe()}.\n"
              f"# Layout {row.name}: predicted {row.time.seconds:.4g} s/step, {row.time.tokens_per_s:,.0f} tokens/s, "
              f"{row.memory.device_bytes / 2**30:.3f} GiB per rank.\n")
    return header + yaml.safe_dump(raw, sort_keys=False)


def write_recipe(row: Planned, cluster: Cluster, recipe_path: str, out: str, force: bool = False) -> None:
    if row.recipe is None or not row.fits:
        raise UserInputError(f"layout {row.name} does not run here ({row.reason}); choose one that fits")
    if os.path.lexists(out) and not force:
        raise UserInputError(f"{printable(out)} already exists; pass --force to overwrite it, or choose another name")
    text = layout_recipe_text(row, cluster, recipe_path)
    with open(out, "w") as f:
        f.write(text)
