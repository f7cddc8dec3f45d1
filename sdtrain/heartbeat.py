"""Where a worker leaves its signs of life, for the node agent's hang watchdog (torch-free:
both sides import it, and the worker never imports the launcher).

    progress/rank<N>.json     step, when it last made progress, its recent collectives
                              (rewritten by a thread of the worker whenever they change)
    progress/rank<N>.stacks   every thread's Python stack, appended by faulthandler when
                              the node agent sends DUMP_SIGNAL to that worker
    progress/rank<N>.dump     the node agent asks for the NCCL flight recorder's entries,
    progress/rank<N>.nccl.json  which the worker writes there
"""

from __future__ import annotations

import signal
from pathlib import Path

DUMP_SIGNAL = signal.SIGUSR2
FIRST_STEP_FACTOR = 3  # the first step of a process also compiles, warms caches and allocates


def progress_dir(run_dir: Path) -> Path:
    return run_dir / "progress"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return progress_dir(run_dir) / f"rank{rank}.json"


def stacks_path(run_dir: Path, rank: int) -> Path:
    return progress_dir(run_dir) / f"rank{rank}.stacks"


def dump_request_path(run_dir: Path, rank: int) -> Path:
    return progress_dir(run_dir) / f"rank{rank}.dump"


def nccl_trace_path(run_dir: Path, rank: int) -> Path:
    return progress_dir(run_dir) / f"rank{rank}.nccl.json"
