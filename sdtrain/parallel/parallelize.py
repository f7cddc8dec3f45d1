"""Apply the recipe's strategies to a plain model from outside, in a fixed order
(as torchtitan does): expert parallelism -> activation checkpointing -> torch.compile ->
pipeline -> data parallel / ZeRO over each stage's replicas."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)

from sdtrain.parallel.data_parallel import DataParallel
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.strategy import Strategy


def parallelize(model: nn.Module, recipe, env: DistEnv, micro_batches: int = 1) -> Strategy:
    if recipe.model.moe.num_experts:
        from sdtrain.parallel.expert_parallel import apply_expert_parallel

        apply_expert_parallel(model, env, micro_batches)
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
            return DataParallel(model, recipe.train, env)
        from sdtrain.parallel.zero import Zero

        return Zero(model, recipe, env)

    if env.pp_size > 1:
        from sdtrain.parallel.pipeline import Pipeline

        return Pipeline(model, recipe, env, micro_batches, replicas)
    return replicas(model)
