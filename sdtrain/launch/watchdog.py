"""The node agent's hang watchdog: a rank that makes no progress for launch.hang_timeout_s.

A hung rank looks alive to everything else: its process runs, its peers wait in a collective
until the collective timeout (minutes to hours) ends the job with a message about sockets.
The watchdog reads each local worker's heartbeat (heartbeat.py) and, when one has not begun a
step or completed a collective for hang_timeout_s (FIRST_STEP_FACTOR times that on a
process's first step), takes the evidence before anything is killed:

- every local worker's Python stack (DUMP_SIGNAL: faulthandler writes it, all threads) and,
  on NCCL, the flight recorder's entries;
- its heartbeat: step, and the collectives it entered and completed;

all of it written to hang/node<N>.json (and sent to the launcher as file lines where the run
directory is not shared). Every node's watchdog sees the hang within a poll of the others
(all ranks stop when one does), so a multi-node job waits GATHER_S for the other nodes to
take theirs, and only then are this node's workers killed; the node's failure report then
names the hang (`fired`), which the launcher turns into one diagnosis (hang_report.py).

Only this agent's own children are signalled or killed, by pid checked with psutil.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from sdtrain.heartbeat import (
    DUMP_SIGNAL,
    FIRST_STEP_FACTOR,
    dump_request_path,
    heartbeat_path,
    nccl_trace_path,
    stacks_path,
)
from sdtrain.launch.collect import encode_files
from sdtrain.launch.disk import write_whole

POLL_S = 0.5
DUMP_WAIT_S = 3.0  # how long the stacks may take to be written
GATHER_S = 5.0  # multi-node: the other nodes' watchdogs take their stacks before any rank here dies
# (less where the run directory is shared: their reports are seen arriving)


def hang_dir(run_dir: Path) -> Path:
    return run_dir / "hang"


class HangWatchdog:
    def __init__(self, run_dir: Path, node_rank: int, nnodes: int, timeout_s: float,
                 say: Callable[[str], None], send_files: bool = False):
        self.run_dir, self.node_rank, self.nnodes, self.timeout_s = run_dir, node_rank, nnodes, timeout_s
        self.say, self.send_files = say, send_files
        self.stopped = threading.Event()
        self.fired: dict | None = None  # what the node's failure report says about the hang
        self.thread = threading.Thread(target=self._watch, name="sdtrain-hang-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(POLL_S):
            workers = self._workers()
            now = time.time()
            stalled = {rank: now - beat["progress_at"] for rank, (_, beat) in workers.items()
                       if beat is not None and now - beat["progress_at"] > self._limit(beat)}
            if stalled:
                self._fire(workers, stalled)
                return

    def _limit(self, beat: dict) -> float:
        return self.timeout_s * (FIRST_STEP_FACTOR if beat.get("step") == beat.get("first_step") else 1)

    def _workers(self) -> dict[int, tuple[psutil.Process, dict | None]]:
        """This agent's live workers by rank, each with its heartbeat (None before its first step).
        Only direct children: a worker's own subprocesses (compile workers) inherit its RANK."""
        workers = {}
        for child in psutil.Process().children():
            try:
                rank = child.environ().get("RANK")
            except (psutil.Error, OSError):
                continue
            if rank is None or not rank.isdigit():
                continue
            beat = _read_json(heartbeat_path(self.run_dir, int(rank)))
            # A heartbeat of an earlier process (a restart, another node on a shared run directory) is not this one's.
            ours = beat and beat.get("pid") == child.pid and isinstance(beat.get("progress_at"), (int, float))
            workers[int(rank)] = (child, beat if ours else None)
        return workers

    def _fire(self, workers: dict, stalled: dict[int, float]) -> None:
        ranks = ", ".join(map(str, sorted(stalled)))
        self.say(f"sdtrain node {self.node_rank}: no progress on rank{'s' if len(stalled) > 1 else ''} {ranks} for "
                 f"{max(stalled.values()):.0f} s (launch.hang_timeout_s {self.timeout_s:g}): taking every rank's stack, "
                 "then stopping the job")
        detected_at = time.time()
        stacks = self._take_stacks(workers)
        ranks = {}
        for rank, (child, _) in sorted(workers.items()):
            beat = _read_json(heartbeat_path(self.run_dir, rank)) or {}
            ranks[str(rank)] = {**(beat if beat.get("pid") == child.pid else {"rank": rank, "pid": child.pid}),
                                "stacks": stacks.get(rank, ""),
                                "nccl": _read_json(nccl_trace_path(self.run_dir, rank))}
        report = {"node_rank": self.node_rank, "host": socket.gethostname(), "detected_at": detected_at,
                  "timeout_s": self.timeout_s, "stalled": {str(r): round(s, 1) for r, s in stalled.items()},
                  "ranks": ranks}
        path = hang_dir(self.run_dir) / f"node{self.node_rank}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, json.dumps(report))
        except OSError as exc:
            self.say(f"sdtrain node {self.node_rank}: cannot write {path}: {exc}")
        if self.send_files:
            for line in encode_files(self.run_dir, [path]):
                self.say(line)
        self.fired = {"stalled": report["stalled"], "timeout_s": self.timeout_s, "file": f"hang/{path.name}"}
        if self.nnodes > 1:
            self._wait_for_the_other_nodes(detected_at)
        for child, _ in workers.values():
            try:
                child.kill()  # psutil checks pid and start time: never a recycled pid
            except psutil.NoSuchProcess:
                pass

    def _wait_for_the_other_nodes(self, detected_at: float) -> None:
        """Up to GATHER_S; less where the run directory is shared and every node's report of
        this hang is already there."""
        deadline = time.monotonic() + GATHER_S
        while not self.stopped.wait(0.2) and time.monotonic() < deadline:
            reports = [_read_json(path) or {} for path in hang_dir(self.run_dir).glob("node*.json")]
            if sum(abs(r.get("detected_at", 0) - detected_at) < 2 * GATHER_S for r in reports) >= self.nnodes:
                return

    def _take_stacks(self, workers: dict) -> dict[int, str]:
        sizes = {}
        for rank, (child, _) in workers.items():
            sizes[rank] = _size(stacks_path(self.run_dir, rank))
            try:
                dump_request_path(self.run_dir, rank).touch()
                child.send_signal(DUMP_SIGNAL)
            except (psutil.NoSuchProcess, OSError):
                pass
        deadline, last = time.monotonic() + DUMP_WAIT_S, None
        while time.monotonic() < deadline:  # written once every file has grown and stopped growing
            time.sleep(0.2)
            now = {rank: _size(stacks_path(self.run_dir, rank)) for rank in workers}
            answered = not any(dump_request_path(self.run_dir, r).exists() for r in workers)  # NCCL's entries too
            if now == last and answered and all(now[r] > sizes[r] for r in workers):
                break
            last = now
        stacks = {}
        for rank in workers:
            try:
                with open(stacks_path(self.run_dir, rank), "rb") as f:
                    f.seek(sizes[rank])
                    stacks[rank] = f.read().decode(errors="replace")
            except OSError:
                stacks[rank] = ""
        return stacks


def _size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
