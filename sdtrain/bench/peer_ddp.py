"""Peer: a plain PyTorch DDP loop (`sdtrain bench --peers torch`), on the recipe's device
and backend (NCCL on GPUs, gloo on CPU).

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_ddp --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sdtrain.bench.peer_common import build_model, join_process_group, parse_args, train_plain
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    device = join_process_group(recipe)
    model = build_model(recipe, device)
    if dist.get_world_size() == 1:
        train_plain(model, recipe, args, device)
    else:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=True)
        train_plain(model, recipe, args, device,
                    sync=lambda last: contextlib.nullcontext() if last else model.no_sync())
    leave_process_group()


if __name__ == "__main__":
    main()
