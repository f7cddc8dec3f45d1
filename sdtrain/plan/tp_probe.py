"""What tensor parallelism really costs here: the calibration's two-block model, cut over `tp`
processes as a run cuts it (tensor_parallel.py, with the recipe's sequence parallelism), its
forward + backward timed, against the one-process time divided by tp.

Its FLOPs and bytes alone priced tp 2 at dp 2's step on the 2-core VM, where it measured 20-50%
slower: the sequence-parallel layers' re-gathers and rings run on the cores that compute, and
the per-layer collectives wait on the slower rank. The ratio measured here (1 = a perfect split)
multiplies the compute of a tp layout in the time model and stands for its tp collectives too.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

ROUNDS = 3  # best of


def tp_overhead(config_fields: dict, loss_chunk_tokens: int, sequences: int, tp: int, sequence_parallel: bool,
                threads: int, one_process_s: float) -> float:
    """(tp ranks' best forward + backward time) x tp / one process's: how much more than a
    perfect split a tp layout's compute takes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tp.json"
        mp.spawn(_rank, args=(tp, str(Path(tmp) / "store"), str(out), config_fields, loss_chunk_tokens, sequences,
                              sequence_parallel, threads), nprocs=tp, join=True)
        seconds = json.loads(out.read_text())["seconds"]
    return seconds * tp / one_process_s


def _rank(rank: int, tp: int, store: str, out: str, config_fields: dict, loss_chunk_tokens: int, sequences: int,
          sequence_parallel: bool, threads: int) -> None:
    import torch
    import torch.distributed as dist

    from sdtrain.model.gpt import GPT, GPTConfig
    from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
    from sdtrain.parallel.tp_collectives import TensorParallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.FileStore(store, tp), rank=rank, world_size=tp)
    try:
        config = GPTConfig(**config_fields)
        model = GPT(config, loss_chunk_tokens=loss_chunk_tokens)
        apply_tensor_parallel(model, TensorParallel.of(dist.group.WORLD, sequence_parallel))
        x = torch.randint(0, config.vocab_size, (sequences, config.seq_len), generator=torch.Generator().manual_seed(0))
        best = float("inf")
        for _ in range(ROUNDS + 1):  # the first: allocations and first calls
            dist.barrier()
            start = time.perf_counter()
            model.loss(model(x), x).backward()
            dist.barrier()
            best = min(best, time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": best}))
    finally:
        dist.destroy_process_group()
