"""Apply the recipe's strategies to a plain model from outside, in a fixed order
(as torchtitan does): tensor parallelism -> expert parallelism -> placements -> activation
checkpointing -> torch.compile -> pipeline -> data parallel / ZeRO over each stage's replicas.

This is the one place that reads the whole recipe: each strategy gets its own section and
the parameters' placements, said here once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)

from sdtrain.parallel.data_parallel import DataParallel
from sdtrain.parallel.expert_parallel import expert_placements
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.placement import DENSE, Placements
from sdtrain.parallel.strategy import Strategy, base_name

if TYPE_CHECKING:
    from sdtrain.parallel.tensor_parallel import TensorParallelPlan


def parallelize(model: nn.Module, recipe, env: DistEnv, micro_batches: int = 1,
                partition: list[list[int]] | None = None, run_dir: Path | None = None) -> Strategy:
    """`partition`: each pipeline chunk's blocks, as the model's stage was built from
    (partition.partition_layers; made here from the recipe when not given); `run_dir`: where
    nvme offload files go unless parallel.zero.nvme_path says otherwise."""
    plan = None
    if env.tp_size > 1:  # first: it swaps layers, which every later wrapper must see
        from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
        from sdtrain.parallel.tp_collectives import TensorParallel

        plan = apply_tensor_parallel(model, TensorParallel.of(env.tp_group, recipe.parallel.sequence_parallel))
    if recipe.model.moe.num_experts:
        from sdtrain.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, env, micro_batches)
    placements = place_parameters(model, env, plan)
    if recipe.train.activation_checkpointing:
        # Recompute each block's activations in backward instead of keeping them.
        for key, block in model.blocks.items():
            model.blocks[key] = checkpoint_wrapper(block)
    if recipe.train.compile:
        for block in model.blocks.values():
            block.compile()

    def replicas(model: nn.Module) -> Strategy:
        """The (stage's) data-parallel replicas: DDP semantics, or ZeRO."""
        if recipe.parallel.zero_stage == 0:
            return DataParallel(model, recipe.train, env, placements, plan)
        from sdtrain.parallel.zero import Zero

        return Zero(model, recipe.parallel.zero_stage, recipe.parallel.zero, recipe.train, env, placements, plan,
                    offload_store(recipe.parallel.zero, run_dir, env))

    if env.pp_size > 1:
        from sdtrain.parallel.partition import partition_layers
        from sdtrain.parallel.pipeline import Pipeline

        partition = partition if partition is not None else partition_layers(recipe.parallel.pipeline, recipe.model)
        return Pipeline(model, recipe.parallel.pipeline, env, micro_batches, partition, replicas,
                        plan.tp if plan is not None else None)
    return replicas(model)


def place_parameters(model: nn.Module, env: DistEnv, plan: TensorParallelPlan | None = None) -> Placements:
    """Every parameter's placement, by base name: whole on every data-parallel rank unless a
    strategy applied above says otherwise (tensor parallelism's pieces, experts under expert
    parallelism)."""
    placements = {base_name(name): DENSE for name, _ in model.named_parameters()}
    if plan is not None:
        placements.update(plan.placements())
    placements.update(expert_placements(model, env))
    return placements


def offload_store(cfg, run_dir: Path | None, env: DistEnv):
    """The rank's offload files where anything is offloaded to nvme (parallel.zero `cfg`):
    under nvme_path, or the run directory's offload/."""
    if "nvme" not in (cfg.offload_optimizer, cfg.offload_params):
        return None
    from sdtrain.parallel.offload.store import OffloadStore

    if cfg.nvme_path is not None:
        return OffloadStore(cfg.nvme_path, env.rank)  # the user's folder: only our subfolder is made in it
    parent = Path(run_dir or ".") / "offload"
    parent.mkdir(parents=True, exist_ok=True)
    return OffloadStore(parent, env.rank)
