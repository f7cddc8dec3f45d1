"""Worker of `sdtrain bench comm`, one per rank, started by the comm bench's node agent.

For every op and size: one run checked exactly against the expected output, warm-up runs,
then `repeats` timed loops of `iters` runs (best kept: a shared machine only ever slows a
loop down), then a fresh run checked again. The time of a loop is the slowest rank's, as a
collective ends when its last rank does. Beside each all_reduce loop, in the same workers
and alternating with it, runs the plainest torch.distributed timing loop there is, so the
bench's own overhead is measured, not assumed. Rank 0 writes `comm.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from sdtrain.bench.comm_ops import make_case
from sdtrain.bench.comm_spec import ELEMENT_BYTES, bandwidths, buffer_elements
from sdtrain.parallel.join import join_process_group

LOOP_BYTES = 2**28  # each timed loop moves about this much per rank (auto iterations)
MIN_ITERS, MAX_ITERS = 5, 100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="sdtrain comm bench worker (started by `sdtrain bench comm`)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--spec-json", required=True, help="ops, sizes, iters, repeats, backend, timeout_s")
    return p.parse_args(argv)


def log_to_file(run_dir: Path, rank: int) -> None:
    """stdout and stderr (Python and C++) to logs/rank<N>.log, where failure reports look."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "logs" / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(run, iters: int, device: torch.device) -> float:
    """Seconds per run of `iters` back-to-back runs, started together on every rank."""
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def plain_all_reduce_loop(elements: int, iters: int, device: torch.device) -> float:
    """What anyone would write to time an all_reduce: one tensor, a barrier, a loop, a clock."""
    tensor = torch.zeros(elements, device=device)
    dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    synchronize(device)
    return (time.perf_counter() - start) / iters


def slowest(seconds: float, device: torch.device) -> float:
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def wrong_ranks(correct: bool, rank: int, world: int, device: torch.device) -> list[int]:
    flags = torch.zeros(world, dtype=torch.float32, device=device)
    flags[rank] = 0.0 if correct else 1.0
    dist.all_reduce(flags)
    return [r for r in range(world) if flags[r].item()]


def measure(op: str, size: int, spec: dict, rank: int, world: int, device: torch.device) -> dict:
    elements = buffer_elements(size, world)
    nbytes = elements * ELEMENT_BYTES
    iters = spec["iters"] or max(MIN_ITERS, min(MAX_ITERS, LOOP_BYTES // nbytes))
    case = make_case(op, elements, rank, world, device)
    case.fresh()
    case.run()
    synchronize(device)
    correct = case.correct()
    for _ in range(max(1, iters // 5)):  # warm-up: connections, buffers, caches
        case.run()
    best, plain = float("inf"), float("inf")
    for _ in range(spec["repeats"]):
        best = min(best, slowest(timed_loop(case.run, iters, device), device))
        if op == "all_reduce":
            plain = min(plain, slowest(plain_all_reduce_loop(elements, iters, device), device))
    case.fresh()
    case.run()
    synchronize(device)
    correct = correct and case.correct()
    algbw, busbw = bandwidths(op, nbytes, best, world)
    row = {"op": op, "bytes": nbytes, "elements": elements, "iters": iters, "time_us": round(best * 1e6, 2),
           "algbw_gbps": round(algbw, 4), "busbw_gbps": round(busbw, 4),
           "wrong_ranks": wrong_ranks(correct, rank, world, device)}
    row["correct"] = not row["wrong_ranks"]
    if op == "all_reduce":
        _, plain_busbw = bandwidths(op, nbytes, plain, world)
        row.update(plain_time_us=round(plain * 1e6, 2), plain_busbw_gbps=round(plain_busbw, 4),
                   vs_plain=round(busbw / plain_busbw, 3))
    return row


def pick_device(backend: str, local_rank: int) -> tuple[str, torch.device]:
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if backend == "nccl" and not use_cuda:
        raise RuntimeError("backend nccl needs a GPU, and this rank sees none")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return "nccl" if backend == "auto" else backend, device
    return "gloo", torch.device("cpu")


@record  # the traceback goes where the node agent finds it, for the root-cause report
def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    log_to_file(args.run_dir, rank)
    spec = json.loads(args.spec_json)
    backend, device = pick_device(spec["backend"], int(os.environ.get("LOCAL_RANK", 0)))
    join_process_group(backend, timedelta(seconds=spec["timeout_s"]))  # the node agent's store: a private file on one node
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    print(f"rank {rank}: {backend} on {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows = []
    for op in spec["ops"]:
        for size in spec["sizes"]:
            rows.append(measure(op, size, spec, rank, world, device))
            print(f"rank {rank}: {rows[-1]}", flush=True)
    if rank == 0:
        result = {"backend": backend, "device": device.type, "world_size": world, "hosts": hosts,
                  "dtype": "float32", "repeats": spec["repeats"], "torch": torch.__version__, "results": rows}
        partial = args.run_dir / "comm.json.partial"
        partial.write_text(json.dumps(result, indent=2))
        os.replace(partial, args.run_dir / "comm.json")
    dist.barrier()
    dist.destroy_process_group()


def run() -> None:
    """Leave without interpreter finalization, success or not (see sdtrain.worker.run: a
    live gloo group torn down at exit can turn exit 1 into SIGABRT)."""
    try:
        main()
    except BaseException:  # noqa: BLE001 - every failure must keep its exit code
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run()
