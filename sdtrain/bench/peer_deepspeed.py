"""Peer: DeepSpeed ZeRO at `--option STAGE` (0-3), with torch's AdamW as the client
optimizer (no DeepSpeed op to compile), started by torchrun on the recipe's device and
backend (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sdtrain.bench.peer_common import (
    build_model,
    deepspeed_config,
    deepspeed_step,
    device_and_backend,
    parse_args,
    recipe_adamw,
    timed_loop,
)
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    device, backend = device_and_backend(recipe)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # read when deepspeed is imported
    import deepspeed

    t = recipe["train"]
    stage = int(args.option or 0)
    deepspeed.init_distributed(dist_backend=backend)
    model = build_model(recipe, device)
    optimizer = recipe_adamw(recipe, model.parameters(), device)
    config = deepspeed_config(recipe, {
        "stage": stage, "overlap_comm": True,
        "reduce_bucket_size": int(recipe["parallel"]["zero"]["reduce_bucket_mb"] * 2**20),
        "stage3_prefetch_bucket_size": 0 if stage < 3 else 5e7})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(t["seed"] + dist.get_rank())

    timed_loop(recipe, args, device, lambda step: deepspeed_step(engine, recipe, generator, device))
    leave_process_group()


if __name__ == "__main__":
    main()
