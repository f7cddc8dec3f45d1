"""The run directory across nodes: shared, or sent back to the launcher.

The launcher writes a marker holding the run id into the run directory before any node
starts. A node agent that finds the marker there sees the launcher's directory (a shared
filesystem, or the launcher's own machine); one that does not has a directory of its own,
and sends its files back over its runner's stderr when the job ends (`collect.py`).
Checkpoints cannot be sent back (every rank writes its shard into one directory), so a
job that checkpoints needs a shared run directory, and a node without one refuses to start.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MARKER = ".sdtrain_run_id"


def move_aside(run_dir: Path) -> Path | None:
    """A fresh run never overwrites an earlier one: move it to <name>.<timestamp>."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    moved = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(run_dir, moved)
    return moved


def write_marker(run_dir: Path, run_id: str) -> None:
    (run_dir / MARKER).write_text(run_id + "\n")


def is_shared(run_dir: Path, run_id: str) -> bool:
    """True where this node sees the directory the launcher prepared for this run."""
    try:
        return (run_dir / MARKER).read_text().strip() == run_id
    except OSError:
        return False


def needs_shared_dir(recipe: dict, resume_from: str) -> str:
    """Why this job needs a shared run directory, or '' if it does not."""
    checkpoint = recipe.get("checkpoint", {})
    if resume_from:
        return f"it resumes from {resume_from}"
    if checkpoint.get("every"):
        return f"it saves checkpoints (checkpoint.every {checkpoint['every']})"
    if checkpoint.get("at_end", True):
        return "it saves a checkpoint at the end (checkpoint.at_end)"
    return ""


def files_to_send(run_dir: Path) -> list[Path]:
    """What a node without the shared directory sends back: logs, failure reports and
    (rank 0's node) metrics and summary. Checkpoints stay where they are."""
    paths = [*sorted((run_dir / "logs").glob("*.log")), *sorted((run_dir / "failures").glob("*.json"))]
    paths += [run_dir / name for name in ("metrics.jsonl", "summary.json") if (run_dir / name).is_file()]
    return paths
