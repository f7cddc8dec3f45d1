"""Apply the recipe's strategies to a plain model from outside, in a fixed order
(as torchtitan does): activation checkpointing -> torch.compile -> data parallel / ZeRO."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)

from sdtrain.parallel.data_parallel import DataParallel
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.strategy import Strategy


def parallelize(model: nn.Module, recipe, env: DistEnv) -> Strategy:
    if recipe.train.activation_checkpointing:
        # Recompute each block's activations in backward instead of keeping them.
        for i, block in enumerate(model.blocks):
            model.blocks[i] = checkpoint_wrapper(block)
    if recipe.train.compile:
        for block in model.blocks:
            block.compile()
    if recipe.parallel.zero_stage == 0:
        return DataParallel(model, recipe.train, env)
    from sdtrain.parallel.zero import Zero

    return Zero(model, recipe, env)
