"""What every bench peer shares: its arguments, the same GPT and batch shape as the sdtrain
run, a timed loop, and the JSON it leaves for `sdtrain bench`.

A peer is started by torchrun (or its own launcher) and knows nothing of sdtrain's
launcher, trainer, data path or strategies: only the model module is shared, so the
ratio measures the framework, not a different network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sdtrain.model import GPT, GPTConfig


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe-json", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--option", default="", help="peer-specific: a ZeRO stage, a reshard flag")
    args, _ = parser.parse_known_args()  # DeepSpeed's launcher adds --local_rank
    return args, json.loads(args.recipe_json)


def build_model(recipe) -> GPT:
    return GPT(GPTConfig(**recipe["model"]), seed=recipe["train"]["seed"])


def micro_batches(recipe, generator: torch.Generator):
    m, t = recipe["model"], recipe["train"]
    for _ in range(t["grad_accum_steps"]):
        data = torch.randint(0, m["vocab_size"], (t["micro_batch_size"], m["seq_len"] + 1), generator=generator)
        yield data[:, :-1], data[:, 1:]


def timed_loop(recipe, args, train_step: Callable[[int], torch.Tensor], extra: Callable[[], dict] = dict) -> None:
    """Run train_step(step) for every step, sample tokens/s every `interval` steps, and
    have rank 0 write them with every rank's peak RSS."""
    t = recipe["train"]
    tokens = args.interval * t["global_batch_size"] * recipe["model"]["seq_len"]
    samples, start = [], time.perf_counter()
    for step in range(1, t["steps"] + 1):
        loss = train_step(step)
        if step % args.interval == 0:
            loss.item()  # wait for the step
            now = time.perf_counter()
            samples.append(tokens / (now - start))
            start = now
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20])
    peaks = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, peak)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"tokens_per_s": samples, "peak_mem_gib": [round(p.item(), 3) for p in peaks],
                       "omp_threads": os.environ.get("OMP_NUM_THREADS"), **extra()}, f)


def train_plain(model, recipe, args, sync: Callable[[bool], object] = lambda last: contextlib.nullcontext()) -> None:
    """The loop the plain-PyTorch peers share: micro-batches (gradient sync only on the last
    one, through `sync`), global-norm clipping, AdamW; timed by timed_loop."""
    t = recipe["train"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                                  weight_decay=t["weight_decay"])
    generator = torch.Generator().manual_seed(t["seed"] + dist.get_rank())
    accum = t["grad_accum_steps"]

    def train_step(step):
        for i, (inputs, targets) in enumerate(micro_batches(recipe, generator)):
            with sync(i == accum - 1):
                logits, _ = model(inputs)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
                (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timed_loop(recipe, args, train_step)
