"""ZeRO stages' step time against DDP's (zero0), in the same two processes, alternately.

Not a test. `sdtrain bench` launches every row afresh, which on a shared 2-core machine
makes a few percent hard to see; here every strategy is built once in the same workers and
their steps are timed in turns, step by step, with the time of each part of a step
(forward+backward, step, and the collectives inside them) so that a difference can be
traced to its cause. Run it as the bench runs a row (one thread each):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/measure_zero_speed.py recipes/bench-20m.yaml [--set key=value]... [--steps 20]

Rank 0 prints one JSON object: per strategy, the median step time, the median ratio of its
steps to the zero0 steps beside them, the same two for the CPU time of a step (both ranks),
and the mean time per step spent in each timed part.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import statistics
import time

import torch
import torch.distributed as dist

from sdtrain.batch import derive_batch
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel import collective_log
from sdtrain.parallel.comm import Comm
from sdtrain.parallel.mesh import init_distributed
from sdtrain.parallel.parallelize import parallelize
from sdtrain.recipe_load import load_recipe

SPENT: collections.Counter = collections.Counter()  # seconds per timed part, of the strategy being run


def timed(owner, name: str, label: str) -> None:
    """Add the time of every call of owner.name to SPENT[label]."""
    call = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            SPENT[label] += time.perf_counter() - start

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--strategies", default="zero0,zero1,zero2,zero3",
                        help="stages, each optionally with settings of its own: zero3@parallel.zero.prefetch_blocks=2")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per strategy")
    parser.add_argument("--malloc", choices=["default", "keep"], default="keep",
                        help="keep: as a CPU worker sets glibc's heap (heap.py); default: glibc's own settings")
    args = parser.parse_args()
    if args.malloc == "keep":
        from sdtrain.train.heap import keep_freed_buffers_in_heap

        print("heap kept:", keep_freed_buffers_in_heap())
    collective_log.install()  # as in a worker: every collective goes through the recorder
    from sdtrain.parallel.zero import Zero

    timed(Comm, "reduce_scatter", "reduce_scatter (issue)")
    timed(Comm, "all_gather", "all_gather (issue)")
    timed(Zero, "_publish_weights", "publish_weights")
    timed(Zero, "_drain", "drain")
    timed(Zero, "_finish", "finish (wait)")
    timed(Zero, "_on_grad_ready", "grad hooks")
    strategies, batches = {}, None
    for name in args.strategies.split(","):
        # a variant of a stage: zero3@parallel.zero.keep_last_blocks=0 (its own settings after @, &-separated)
        stage_name, _, variant = name.partition("@")
        stage = int(stage_name.removeprefix("zero"))
        recipe = load_recipe(args.recipe, [*args.overrides, *filter(None, variant.split("&")),
                                           f"parallel.zero_stage={stage}"])
        if not dist.is_initialized():
            env = init_distributed("gloo", 600)
        plan = derive_batch(recipe.train.global_batch_size, recipe.train.micro_batch_size,
                            recipe.train.grad_accum_steps, env.dp_size)
        with torch.device("meta" if stage else "cpu"):
            model = GPT(GPTConfig(**recipe.model.model_dump()), seed=recipe.train.seed)
        strategies[name] = parallelize(model, recipe, env, plan.grad_accum)
        generator = torch.Generator().manual_seed(env.rank)
        shape = (plan.micro_batch, recipe.model.seq_len)
        batches = [(torch.randint(recipe.model.vocab_size, shape, generator=generator),
                    torch.randint(recipe.model.vocab_size, shape, generator=generator)) for _ in range(plan.grad_accum)]

    def step(strategy) -> None:
        start = time.perf_counter()
        strategy.forward_backward(batches, _no_autocast)
        middle = time.perf_counter()
        strategy.step(1e-4, 1.0)
        SPENT["forward_backward"] += middle - start
        SPENT["step"] += time.perf_counter() - middle

    for strategy in strategies.values():
        step(strategy)  # untimed: first-step allocations
    # Strategies take turns step by step, so the machine's load (other processes on a
    # shared machine) falls on all of them alike; each step's time is compared with the
    # zero0 step next to it, and the median of those ratios is reported.
    times = {name: [] for name in strategies}
    cpu = {name: [] for name in strategies}  # this process's CPU seconds (all threads, gloo's too)
    faults = {name: 0 for name in strategies}  # minor page faults (memory the kernel handed out anew)
    SPENT.clear()
    spent = {}
    for _ in range(args.steps):
        for name, strategy in strategies.items():
            before = dict(SPENT)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(strategy)
            cpu_used = time.process_time() - cpu_start
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
            dist.barrier()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_used)
            for key, value in SPENT.items():
                spent.setdefault(name, collections.Counter())[key] += value - before.get(key, 0.0)
    # Under load, wall time is mostly a share of the cores: the CPU time a step takes (both
    # ranks together) is the steadier measure of what it costs.
    cpu_both = {name: torch.tensor(c, dtype=torch.float64) for name, c in cpu.items()}
    for c in cpu_both.values():
        dist.all_reduce(c)
    if env.rank == 0:
        base, cpu_base = times.get("zero0"), cpu_both.get("zero0")
        count = len(times[next(iter(times))])
        print(json.dumps({name: {
            "step_ms": round(statistics.median(t) * 1e3, 1),
            "vs_zero0": round(statistics.median(a / b for a, b in zip(t, base)), 3) if base else None,
            "cpu_ms": round(cpu_both[name].median().item() * 1e3, 1),
            "cpu_vs_zero0": round((cpu_both[name] / cpu_base).median().item(), 3) if base else None,
            "page_faults_per_step": faults[name] // count,
            "parts_ms": {k: round(v / count * 1e3, 1) for k, v in spent[name].items()},
        } for name, t in times.items()}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


if __name__ == "__main__":
    main()
