"""This worker's signs of life for the node agent's hang watchdog (file layout: heartbeat.py).

A thread rewrites progress/rank<N>.json whenever something changed: the step the trainer
began last, and the collectives entered and completed (collective_log.py). In a hang nothing
changes, so the file left behind is the state of the hang, even if the thread itself can no
longer run. Every thread's stack is written by faulthandler, from the signal handler, so it
comes even from a rank blocked in C++ with the GIL held. On NCCL, torch's flight recorder is
switched on, and its entries are written when the node agent asks for them.
"""

from __future__ import annotations

import faulthandler
import json
import os
import pickle
import socket
import threading
import time
from pathlib import Path

import torch

from sdtrain.heartbeat import (
    DUMP_SIGNAL,
    dump_request_path,
    heartbeat_path,
    nccl_trace_path,
    progress_dir,
    stacks_path,
)
from sdtrain.parallel import collective_log

BEAT_S = 0.5  # a rewrite at most this often: thousands of ranks may share one filesystem
NCCL_ENTRIES = 20


class Progress:
    def __init__(self, run_dir: Path, rank: int, backend: str):
        self.run_dir, self.rank = run_dir, rank
        progress_dir(run_dir).mkdir(parents=True, exist_ok=True)
        self.nccl = backend in ("nccl", "auto") and torch.cuda.is_available()
        if self.nccl:  # read when the NCCL process group is made: before init_process_group
            os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        self.log = collective_log.install()
        self.stacks = open(stacks_path(run_dir, rank), "w")  # noqa: SIM115 - open for the life of the process
        faulthandler.register(DUMP_SIGNAL, file=self.stacks, all_threads=True)
        self.step: int | None = None
        self.first_step: int | None = None
        self.step_at = time.time()
        self.fixed = {"rank": rank, "node_rank": int(os.environ.get("GROUP_RANK", 0)),
                      "local_rank": int(os.environ.get("LOCAL_RANK", 0)), "pid": os.getpid(),
                      "host": socket.gethostname(), "main_thread": threading.main_thread().ident}
        threading.Thread(target=self._beat, name="sdtrain-heartbeat", daemon=True).start()

    def mark_step(self, step: int) -> None:
        if self.first_step is None:
            self.first_step = step
        self.step, self.step_at = step, time.time()

    def _beat(self) -> None:
        written = None
        while True:
            try:
                state = (self.step, self.step_at, self.log.completed, self.log.seq)
                if state != written and self.step is not None:  # the watchdog arms at the first step
                    self._write()
                    written = state
                self._answer_dump_request()
            except Exception as exc:  # noqa: BLE001 - a silent heartbeat would read as a hang
                print(f"sdtrain heartbeat: {type(exc).__name__}: {exc}", flush=True)
            time.sleep(BEAT_S)

    def _write(self) -> None:
        collectives = self.log.snapshot()
        beat = {**self.fixed, "step": self.step, "first_step": self.first_step,
                "progress_at": max(self.step_at, collectives["changed_at"]), **collectives}
        path = heartbeat_path(self.run_dir, self.rank)
        try:
            path.with_suffix(".tmp").write_text(json.dumps(beat))
            os.replace(path.with_suffix(".tmp"), path)
        except OSError:
            pass  # a full disk must not kill training; the watchdog then sees no progress and says so

    def _answer_dump_request(self) -> None:
        request = dump_request_path(self.run_dir, self.rank)
        if not request.exists():
            return
        request.unlink(missing_ok=True)
        if self.nccl:
            try:
                nccl_trace_path(self.run_dir, self.rank).write_text(json.dumps(nccl_entries()))
            except Exception as exc:  # noqa: BLE001 - a private torch API: a diagnosis without it still helps
                nccl_trace_path(self.run_dir, self.rank).write_text(json.dumps({"error": repr(exc)}))


def nccl_entries() -> dict:
    """The last entries of torch's NCCL flight recorder (our own process's pickle)."""
    from torch._C._distributed_c10d import _dump_nccl_trace

    trace = pickle.loads(_dump_nccl_trace(includeCollectives=True, includeStackTraces=False, onlyActive=False))
    keys = ("record_id", "pg_id", "process_group", "collective_seq_id", "p2p_seq_id", "profiling_name",
            "input_sizes", "output_sizes", "state", "time_created_ns", "time_discovered_completed_ns")
    return {"entries": [{k: str(e.get(k)) for k in keys} for e in trace.get("entries", [])[-NCCL_ENTRIES:]]}


PROGRESS: Progress | None = None


def start_progress(run_dir: Path, rank: int, backend: str) -> Progress | None:
    """Start the heartbeat; where the run directory refuses its files, train without it (the
    watchdog then never sees this rank start a step, so it never calls it hung)."""
    global PROGRESS
    try:
        PROGRESS = Progress(run_dir, rank, backend)
    except OSError as exc:
        print(f"rank {rank}: no hang watchdog for this rank: {exc}", flush=True)
    return PROGRESS


def mark_step(step: int) -> None:
    """The trainer began `step`: progress (a no-op outside a worker)."""
    if PROGRESS is not None:
        PROGRESS.mark_step(step)
