"""Preemption (checkpoint.on_preempt): finish the step, save a checkpoint there, stop.

The request is the file `preempt.request` in the run directory. The launcher writes it on
SIGTERM/SIGUSR1; a node agent writes it on SIGUSR1 (what srun passes on when Slurm's
`--signal=USR1@T` or `scancel --signal=USR1` fires). A file needs no signal to cross ssh,
and no worker can miss it by starting late. Each rank looks for it once a step, and the
step's guard (nonfinite.py) sums the answers over every rank, so all ranks stop after the
same step even where the nodes do not share the run directory. Rank 0 then writes
`preempted.json` (step, checkpoint), which tells the launcher to exit PREEMPTED_EXIT.

Torch-free: the launcher uses the names and the exit code.
"""

from __future__ import annotations

import json
from pathlib import Path

PREEMPTED_EXIT = 3  # the launcher's exit code after a preemption saved its checkpoint
REQUEST = "preempt.request"
DONE = "preempted.json"


class PreemptRequest:
    """Whether this job was asked to stop at the next step boundary (only with on_preempt)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.request_file = run_dir / REQUEST
        self.enabled = enabled

    @property
    def requested(self) -> bool:
        return self.enabled and self.request_file.exists()


def request_preemption(run_dir: Path) -> None:
    (run_dir / REQUEST).touch()


def write_preempted(run_dir: Path, step: int, checkpoint: str | None) -> None:
    (run_dir / DONE).write_text(json.dumps({"step": step, "checkpoint": checkpoint}) + "\n")


def read_preempted(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / DONE).read_text())
    except (OSError, ValueError):
        return None


def clear_preemption(run_dir: Path) -> None:
    """Before a launch: an earlier job's request or result must not stop this one."""
    for name in (REQUEST, DONE):
        (run_dir / name).unlink(missing_ok=True)
