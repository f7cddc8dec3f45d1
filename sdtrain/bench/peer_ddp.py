"""Peer: a plain PyTorch DDP loop (`sdtrain bench --peers torch`).

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_ddp --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sdtrain.bench.peer_common import build_model, micro_batches, parse_args, timed_loop


def main() -> None:
    args, recipe = parse_args()
    t = recipe["train"]
    dist.init_process_group("gloo")
    model = build_model(recipe)
    if dist.get_world_size() > 1:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                                  weight_decay=t["weight_decay"])
    generator = torch.Generator().manual_seed(t["seed"] + dist.get_rank())
    accum = t["grad_accum_steps"]

    def train_step(step):
        for i, (inputs, targets) in enumerate(micro_batches(recipe, generator)):
            last = i == accum - 1 or not isinstance(model, DistributedDataParallel)
            with contextlib.nullcontext() if last else model.no_sync():
                logits, _ = model(inputs)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timed_loop(recipe, args, train_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
