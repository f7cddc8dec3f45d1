"""A node that died mid-run without a report: its agent killed, or its connection cut.

Its workers die with it and nobody is left to write a failure report; the launcher only
sees the node's command end by a signal (or ssh's 255 once the job was under way). Then
the useful words are which node, at which step, and that its agent or connection was
killed, not "failed before any rank reported". The ranks of the other nodes fail a moment
later in their next collective ("Connection reset by peer"): those are what its death did
to them, so the dead node is the root cause and they are listed as stopped with it
(report.py), unless one of them failed of something else.

How far the run had come is not read from metrics.jsonl alone: where the nodes do not share
the run directory, the launcher's copy is the one rank 0's node sends when it ends, and
never arrives when that node is the one that died. Every rank's heartbeat (the step it
began) is in a shared run directory as it runs, and the surviving nodes send theirs back
with their logs (node.py), so either says the run was under way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sdtrain.heartbeat import progress_dir
from sdtrain.launch.failures import describe_exit

KILLED_CODES = (255, 128 + 9, 128 + 15)  # ssh's lost connection; a shell's report of SIGKILL / SIGTERM
MAX_HEARTBEAT_BYTES = 2**20  # a heartbeat is a few KiB; a larger file was not written by a rank
DIED_HINT = ("its agent and workers are gone and left no failure report; the ranks of the other nodes "
             "stopped because it was gone. Its last lines:")


def last_step(run_dir: Path) -> int | None:
    """The last step the run is known to have reached (None before the first): the later of
    the last step metrics.jsonl logged and the last one a rank's heartbeat says it began."""
    steps = [step for step in (last_logged_step(run_dir), last_begun_step(run_dir)) if step is not None]
    return max(steps, default=None)


def last_begun_step(run_dir: Path) -> int | None:
    """The highest step any rank's heartbeat (progress/rank<N>.json) says it began."""
    steps = []
    for path in progress_dir(Path(run_dir)).glob("rank*.json"):
        if not re.fullmatch(r"rank\d+\.json", path.name):
            continue  # rank<N>.nccl.json: the flight recorder's entries
        try:
            with open(path, "rb") as f:
                beat = json.loads(f.read(MAX_HEARTBEAT_BYTES))  # a longer one is cut, and does not parse
        except (OSError, ValueError, RecursionError):
            continue  # sent by a node, or cut by a full disk: not evidence
        step = beat.get("step") if isinstance(beat, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            steps.append(step)
    return max(steps, default=None)


def last_logged_step(run_dir: Path) -> int | None:
    """The last step metrics.jsonl recorded (None before the first)."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            return record["step"]
    return None


def node_died(node, code: int, run_dir: Path) -> str | None:
    """The title for a node that died mid-run, or None if its exit says something else."""
    step = last_step(run_dir)
    if code >= 0 and not (code in KILLED_CODES and step is not None):
        return None
    how = f", {describe_exit(code)}" if code < 0 else f", exit code {code}"
    return f"node {node.node_rank} ({node.host}) died at step {step or 0} (its agent or connection was killed{how})"
