"""sdtrain's DDP step (its model, strategy and loss) against the bench's plain peer (a llama
written plainly, torch's DDP, F.cross_entropy, fused AdamW), in the same two processes, step
by step in turns: what `sdtrain bench RECIPE --peers plain` compares, without launch-to-launch
noise, and with variants of sdtrain's side to find what a difference costs.

Not a test. Run it as the bench runs a row (one thread each):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/measure_ddp_speed.py recipes/llama-tiny.yaml [--set key=value]... [--variants ddp,ddp@train.loss_chunk_tokens=0]

Rank 0 prints, per variant, the median step time and the median ratio of the plain step
beside it to its own (above 1: sdtrain faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sdtrain.batch import derive_batch
from sdtrain.bench.peer_common import recipe_adamw
from sdtrain.bench.plain_llama import PlainLlama
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.mesh import init_distributed
from sdtrain.parallel.parallelize import parallelize
from sdtrain.recipe_load import load_recipe


def plain_step(model, optimizer, batches, grad_clip: float) -> None:
    """The bench's plain loop (peer_common.train_plain), fp32."""
    for i, (inputs, targets) in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else model.no_sync():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            (loss / len(batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, both sides")
    parser.add_argument("--variants", default="ddp", help="sdtrain's side, each with settings after @, &-separated")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    env = None
    sdtrain_steps = {}
    for name in args.variants.split(","):
        recipe = load_recipe(args.recipe, [*args.overrides, *filter(None, name.partition("@")[2].split("&"))])
        env = env or init_distributed("gloo", 600)
        plan = derive_batch(recipe.train.global_batch_size, recipe.train.micro_batch_size,
                            recipe.train.grad_accum_steps, env.dp_size)
        strategy = parallelize(GPT(GPTConfig(**recipe.model.model_dump()), seed=recipe.train.seed), recipe, env,
                               plan.grad_accum)
        sdtrain_steps[name] = (strategy, recipe.train.grad_clip)
    raw = recipe.model_dump(mode="json")
    plain = DistributedDataParallel(PlainLlama(raw["model"]), gradient_as_bucket_view=True)
    optimizer = recipe_adamw(raw, plain.parameters(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(env.rank)
    shape = (plan.micro_batch, recipe.model.seq_len)
    batches = [(torch.randint(recipe.model.vocab_size, shape, generator=generator),
                torch.randint(recipe.model.vocab_size, shape, generator=generator)) for _ in range(plan.grad_accum)]

    def timed(step) -> float:
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        return time.perf_counter() - start

    def ours(name):
        strategy, clip = sdtrain_steps[name]
        return lambda: (strategy.forward_backward(batches, contextlib.nullcontext), strategy.step(1e-4, clip))

    def theirs():
        plain_step(plain, optimizer, batches, recipe.train.grad_clip)

    for name in sdtrain_steps:
        timed(ours(name))  # first-step allocations, untimed
    timed(theirs)
    times = {name: [] for name in [*sdtrain_steps, "plain"]}
    for _ in range(args.steps):
        for name in sdtrain_steps:
            times[name].append(timed(ours(name)))
        times["plain"].append(timed(theirs))
    if env.rank == 0:
        print(json.dumps({name: {
            "step_ms": round(statistics.median(t) * 1e3, 2),
            "plain_over_this": round(statistics.median(p / s for p, s in zip(times["plain"], t)), 3),
        } for name, t in times.items()}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
