"""The user's nvme_path, judged without torch: the launcher says it before anything starts
(estimate/disk.py), and each worker's store refuses it in the same words (store.py)."""

from __future__ import annotations

import os
from pathlib import Path


def folder_problem(path: str | os.PathLike) -> str | None:
    """None if `path` is an existing directory this user can write (sdtrain makes only its own
    subfolder in it, never the path itself), else what is wrong and how to fix it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return (f"parallel.zero.nvme_path {str(path)!r} is not a directory: create it (on a local NVMe disk, with "
                "room for the offloaded state) or set nvme_path null for the run directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"parallel.zero.nvme_path {str(path)!r} is not writable by this user: choose a folder you can "
                "write, or set nvme_path null for the run directory")
    return None
