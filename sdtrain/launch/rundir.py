"""The run directory across nodes: shared, or sent back to the launcher.

The launcher writes a marker holding the run id into the run directory before any node
starts. A node agent that finds the marker there sees the launcher's directory (a shared
filesystem, or the launcher's own machine); one that does not has a directory of its own,
and sends its files back over its runner's stderr when the job ends (`collect.py`).
Checkpoints cannot be sent back (every rank writes its shard into one directory), so a
job that checkpoints needs a shared run directory, and a node without one refuses to start.

A fresh run moves an earlier one aside, and only that: a directory that holds anything but
an sdtrain run (`--run-dir .` in a project) is refused, untouched.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.launch.disk import describe, fix_for, write_whole

MARKER = ".sdtrain_run_id"
# Everything sdtrain itself writes into a run directory.
RUN_NAMES = {MARKER, "recipe.yaml", "metrics.jsonl", "summary.json", "logs", "failures", "checkpoints", "progress", "hang"}


def holds_a_run(names: set[str], run_dir: Path) -> bool:
    """An sdtrain run: its marker; or, from before the marker, a recipe beside metrics or rank
    logs, and nothing that sdtrain does not write."""
    if MARKER in names:
        return True
    ran = "metrics.jsonl" in names or any((run_dir / "logs").glob("rank*.log"))
    return "recipe.yaml" in names and ran and names <= RUN_NAMES


def check_run_dir(run_dir: Path, moves_earlier_run: bool) -> None:
    """UserInputError unless the run directory may be used: new, empty, or an sdtrain run
    (which a fresh run moves aside). Where nothing is moved (--node-rank, a resume from
    inside it), a directory of sdtrain's files alone will do too: another node may be
    preparing it right now."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"--run-dir {run_dir} is a file, not a directory: give a directory for the run")
    try:
        names = set(os.listdir(run_dir)) if run_dir.exists() else set()
    except OSError as exc:
        raise UserInputError(f"--run-dir {run_dir} cannot be read: {describe(exc)}") from None
    if not names or holds_a_run(names, run_dir) or (not moves_earlier_run and names <= RUN_NAMES):
        return
    theirs = sorted(names - RUN_NAMES)[:3]
    raise UserInputError(
        f"--run-dir {run_dir} is not empty and holds no sdtrain run (no {MARKER}; it has "
        f"{', '.join(theirs) or ', '.join(sorted(names)[:3])}): sdtrain moves aside an earlier run, never a folder "
        f"of yours. Give a new or empty directory, e.g. --run-dir {run_dir / 'runs' / 'NAME'}"
    )


def move_aside(run_dir: Path) -> Path | None:
    """A fresh run never overwrites an earlier one: move it to <name>.<timestamp>.
    Anything that is not an sdtrain run stays where it is (UserInputError)."""
    check_run_dir(run_dir, moves_earlier_run=True)
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return None
    moved = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(run_dir, moved)
    return moved


def prepare(run_dir: Path, files: dict[str, str], move_earlier_run: bool, write: bool = True) -> Path | None:
    """Make the run directory: an earlier run moved aside (if asked), logs/, no stale failure
    reports, and `files` (name -> text) written whole. Returns where the earlier run went.
    If the filesystem refuses (full, read-only, no permission), things are left as they were
    (the new directory removed, the earlier run put back) and a UserInputError says why."""
    made = run_dir  # the topmost folder this creates: what a failure removes
    while not made.parent.exists():
        made = made.parent
    existed, moved = run_dir.exists(), None
    try:
        if move_earlier_run:
            moved = move_aside(run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        if write:
            for stale in [*(run_dir / "failures").glob("node*.json"), *(run_dir / "hang").glob("node*.json")]:
                stale.unlink()
            for name, text in files.items():
                write_whole(run_dir / name, text)
    except OSError as exc:
        if moved is not None or not existed:
            shutil.rmtree(run_dir if moved is not None else made, ignore_errors=True)
        if moved is not None:
            try:
                os.rename(moved, run_dir)
            except OSError:
                pass
        hint = fix_for(exc)
        raise UserInputError(f"cannot prepare the run directory {run_dir}: {describe(exc)}"
                             + (f"; {hint}" if hint else "")) from None
    return moved


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
