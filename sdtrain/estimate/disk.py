"""Room on disk for nvme offload: the files every rank of a node writes under
parallel.zero.nvme_path (null: the run directory's offload/), against the free space of the
filesystem that folder is on. The folder need not exist yet (the workers make it): its
nearest existing parent says which filesystem, and how much is free there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sdtrain.estimate.terms import gib
from sdtrain.parallel.offload.folder import folder_problem

OFFLOAD_FOLDER = "offload"  # under the run directory, where nvme_path is null


def offload_folder(recipe, run_dir: Path | str) -> Path:
    path = recipe.parallel.zero.nvme_path
    return Path(path).expanduser() if path else Path(run_dir) / OFFLOAD_FOLDER


def nvme_path_problem(recipe) -> str | None:
    """A user's nvme_path that the workers would refuse (parallel/offload/store.py's
    check_offload_dir: offload/folder.py), said before launch: it must be an existing writable
    folder, since sdtrain makes only its own subfolder in it. None: fine, unused, or null."""
    zero = recipe.parallel.zero
    path = zero.nvme_path
    if not path or "nvme" not in (zero.offload_optimizer, zero.offload_params):
        return None
    return folder_problem(path)


def nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(nearest_existing(path)).free


def disk_problem(folder: Path, per_rank: float, ranks_here: int) -> str | None:
    """None if `ranks_here` ranks' offload files (`per_rank` bytes each) fit in the free space
    at `folder`, else the line saying how much is needed, how much is free, and what to do."""
    if per_rank <= 0:
        return None
    needed, free = per_rank * ranks_here, free_bytes(folder)
    if needed <= free:
        return None
    return (f"nvme offload files will not fit on disk: {ranks_here} rank(s) of this node need {gib(needed)} "
            f"({gib(per_rank)} each) under {folder}, and {gib(free)} is free there "
            f"({nearest_existing(folder)}); set parallel.zero.nvme_path to a folder on a disk with room, "
            "or offload less (offload_params none, or offload_optimizer none)")
