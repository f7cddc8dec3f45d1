"""The peer for `sdtrain bench --peers torch`: a plain PyTorch DDP loop, nothing of sdtrain's
launcher, trainer or data path — only the same GPT module, optimizer settings and batch
shape. Started with torchrun; rank 0 writes its timings as JSON.

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_ddp --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sdtrain.model import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe-json", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args()
    recipe = json.loads(args.recipe_json)
    m, t = recipe["model"], recipe["train"]

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(t["seed"])
    model = GPT(GPTConfig(**m))
    if world > 1:
        model = DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                                  weight_decay=t["weight_decay"])
    micro, accum = t["micro_batch_size"], t["grad_accum_steps"]
    generator = torch.Generator().manual_seed(t["seed"] + rank)

    timings, start = [], time.perf_counter()
    tokens_per_interval = args.interval * t["global_batch_size"] * m["seq_len"]
    for step in range(1, t["steps"] + 1):
        for i in range(accum):
            data = torch.randint(0, m["vocab_size"], (micro, m["seq_len"] + 1), generator=generator)
            sync = i == accum - 1 or world == 1
            with (model.no_sync() if not sync else torch.enable_grad()):
                logits, _ = model(data[:, :-1])
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), data[:, 1:].reshape(-1))
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.interval == 0:
            loss.item()
            now = time.perf_counter()
            timings.append(tokens_per_interval / (now - start))
            start = now
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"tokens_per_s": timings, "peak_mem_gib": [round(p.item(), 3) for p in peaks],
                       "omp_threads": os.environ.get("OMP_NUM_THREADS")}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
