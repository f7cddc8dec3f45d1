"""A node that died mid-run without a report: its agent killed, or its connection cut.

Its workers die with it and nobody is left to write a failure report; the launcher only
sees the node's command end by a signal (or ssh's 255 once the job was under way). Then
the useful words are which node, at which step, and that its agent or connection was
killed, not "failed before any rank reported". The ranks of the other nodes fail a moment
later in their next collective ("Connection reset by peer"): those are what its death did
to them, so the dead node is the root cause and they are listed as stopped with it
(report.py), unless one of them failed of something else.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdtrain.launch.failures import describe_exit

KILLED_CODES = (255, 128 + 9, 128 + 15)  # ssh's lost connection; a shell's report of SIGKILL / SIGTERM
DIED_HINT = ("its agent and workers are gone and left no failure report; the ranks of the other nodes "
             "stopped because it was gone. Its last lines:")


def last_step(run_dir: Path) -> int | None:
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
