"""This rank's memory, where the node agent finds it if the rank dies: memory/rank<N>.json.

A daemon thread rewrites it every WATCH_S with the resident set now and at its peak (and
the CUDA allocator's on a GPU), so a rank the kernel kills for memory leaves its last
reading behind: the root-cause report compares it with the limit.

Drill: SDTRAIN_INJECT_ADDRESS_LIMIT=RANK:BYTES gives that rank an address-space limit of
BYTES more than it has mapped at start (RLIMIT_AS): its allocations then fail as they would
on a machine out of memory, without endangering this one.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from pathlib import Path

import psutil

from sdtrain.train.faults import ADDRESS_LIMIT, parse_address_limit

WATCH_S = 0.5


def memory_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "memory" / f"rank{rank}.json"


def read_memory(run_dir: Path, rank: int) -> dict | None:
    """The rank's last reading, or None (no file, or one cut short)."""
    try:
        reading = json.loads(memory_path(run_dir, rank).read_text())
    except (OSError, ValueError):
        return None
    return reading if isinstance(reading, dict) else None


def address_limit_drill(rank: int) -> int | None:
    """Apply the drill to this rank, if it names it; the bytes it allows beyond now."""
    value = os.environ.get(ADDRESS_LIMIT, "")
    if not value:
        return None
    target, extra = parse_address_limit(value)  # checked before launch (check_drills)
    if target != rank:
        return None
    mapped = psutil.Process().memory_info().vms
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    return extra


def start_memory_watch(run_dir: Path, rank: int) -> None:
    limit = address_limit_drill(rank)
    path = memory_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    baseline = psutil.Process().memory_info().rss
    thread = threading.Thread(target=_watch, args=(path, limit, baseline), name="sdtrain-memory-watch", daemon=True)
    thread.start()


def _watch(path: Path, limit: int | None, baseline: int) -> None:
    process = psutil.Process()
    tmp = path.with_suffix(".tmp")
    while True:
        reading = {"rss": process.memory_info().rss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "time": time.time(), "pid": os.getpid()}
        if limit is not None:  # the drill's limit, as resident bytes: what it allows beyond the start
            reading["limit"] = limit + baseline
        cuda = _cuda_reading()
        if cuda:
            reading.update(cuda)
        try:
            tmp.write_text(json.dumps(reading))
            os.replace(tmp, path)
        except OSError:
            pass  # a full disk: the run's own checks report it
        time.sleep(WATCH_S)


def _cuda_reading() -> dict:
    try:
        import torch

        if not torch.cuda.is_initialized():
            return {}
        return {"cuda_allocated": torch.cuda.memory_allocated(), "cuda_peak": torch.cuda.max_memory_allocated()}
    except Exception:  # noqa: BLE001 - a reading is never worth a crash
        return {}
