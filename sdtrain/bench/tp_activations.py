"""Activation memory per rank under tensor parallelism, with and without sequence parallelism:
the bytes autograd keeps for backward (each saved storage once; parameters are model state, not
counted) in one forward and loss of the GPT, at tp 1 and at each T, as one table:

    python -m sdtrain.bench.tp_activations [--tp 2,4] [--n-layers 2] [--d-model 512] [--seq-len 2048]

Counted, not sampled: a CPU's resident set size (what `sdtrain bench` shows there) moves with
the allocator's caching by more than the difference sought. The T ranks are real processes
over gloo, as in training.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdtrain.bench.tp_activations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", default="2,4", help="tensor-parallel sizes, e.g. 2,4")
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank's micro-batch")
    parser.add_argument("--json", help="also write the byte counts here")
    return parser.parse_args(argv)


def saved_bytes(model: GPT, config: GPTConfig, batch: int) -> int:
    """Bytes autograd saves for backward in one forward and loss (then runs the backward)."""
    ids = torch.randint(0, config.vocab_size, (batch, config.seq_len + 1), generator=torch.Generator().manual_seed(0))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:  # a weight (or a view of one) is model state
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    return sum(saved.values())


def _rank(rank: int, world: int, store: str, config: GPTConfig, batch: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    counts = {}
    for sequence_parallel in (False, True):
        model = GPT(config, seed=1)
        apply_tensor_parallel(model, TensorParallel.of(dist.group.WORLD, sequence_parallel))
        counts[f"tp{world}" + ("+sp" if sequence_parallel else "")] = saved_bytes(model, config, batch)
    gathered = [None] * world
    dist.all_gather_object(gathered, counts)  # every rank's, so the table shows the largest
    if rank == 0:
        Path(out).write_text(json.dumps({k: max(c[k] for c in gathered) for k in counts}))
    del model
    # reference cycles may keep the models' collectives' group alive past its destruction, and
    # gloo's threads then abort the exit (tests/test_tensor_parallel.py saw it too)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def measure(config: GPTConfig, sizes: list[int], batch: int) -> dict[str, int]:
    """Saved bytes of the largest rank: `tp1`, then `tp<T>` and `tp<T>+sp` for each T."""
    torch.set_num_threads(1)
    counts = {"tp1": saved_bytes(GPT(config, seed=1), config, batch)}
    with tempfile.TemporaryDirectory(prefix="sdtrain-tp-activations-") as tmp:
        for world in sizes:
            out = f"{tmp}/{world}.json"
            mp.spawn(_rank, args=(world, f"{tmp}/store{world}", config, batch, out), nprocs=world)
            counts.update(json.loads(Path(out).read_text()))
    return counts


def main(argv=None) -> None:
    args = parse_args(argv)
    config = GPTConfig(n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads, seq_len=args.seq_len)
    counts = measure(config, [int(t) for t in args.tp.split(",") if t.strip()], args.batch)
    print(f"activations saved for backward per rank: {args.n_layers} layers, d_model {args.d_model}, "
          f"{args.batch} x {args.seq_len} tokens")
    for name, size in counts.items():
        print(f"  {name:8} {size / 2**20:9.1f} MiB  {size / counts['tp1']:.3f} of tp1")
    if args.json:
        Path(args.json).write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
