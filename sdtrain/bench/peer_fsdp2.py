"""Peer: PyTorch FSDP2 (`fully_shard` on every block, then the root).

`--option reshard` frees each block's gathered weights after forward (like ZeRO-3);
`--option keep` keeps them until backward (like ZeRO-2).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sdtrain.bench.peer_common import build_model, parse_args, train_plain
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    dist.init_process_group("gloo")
    model = build_model(recipe)
    reshard = args.option != "keep"
    bf16 = recipe["train"]["precision"] == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)

    def sync(last: bool):
        model.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch only
        return contextlib.nullcontext()

    train_plain(model, recipe, args, sync=sync)
    leave_process_group()


if __name__ == "__main__":
    main()
