"""Peer: PyTorch FSDP2 (`fully_shard` on every block, then the root).

`--option reshard` frees each block's gathered weights after forward (like ZeRO-3);
`--option keep` keeps them until backward (like ZeRO-2). On the recipe's device and backend.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sdtrain.bench.peer_common import build_model, join_process_group, parse_args, train_plain
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    device = join_process_group(recipe)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # not the default: CUDA whenever visible
    model = build_model(recipe, device)
    reshard = args.option != "keep"
    bf16 = recipe["train"]["precision"] == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)

    def sync(last: bool):
        model.set_requires_gradient_sync(last)  # reduce-scatter on the last micro-batch only
        return contextlib.nullcontext()

    # bf16 is the policy's cast; under fp16 the loop autocasts as sdtrain does
    train_plain(model, recipe, args, device, sync=sync, autocast=not bf16)
    leave_process_group()


if __name__ == "__main__":
    main()
