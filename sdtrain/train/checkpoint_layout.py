"""The on-disk layout of a run's checkpoints, readable without torch (the launcher checks
a resume target before it starts anything)."""

from __future__ import annotations

import json
from pathlib import Path

from sdtrain.errors import CheckpointError

LATEST = "latest"
INFO = "sdtrain.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_dir(run_dir) / pointer.read_text().strip()
    return path if (path / INFO).is_file() else None


def read_info(path: Path) -> dict:
    """The sdtrain.json of a checkpoint; CheckpointError if it is not a complete checkpoint."""
    info_file = Path(path) / INFO
    if not info_file.is_file():
        raise CheckpointError(
            f"{path} is not an sdtrain checkpoint (no {INFO}); point at a checkpoints/step_<N> "
            "folder, or a run directory with checkpoints/latest"
        )
    try:
        info = json.loads(info_file.read_text())
        int(info["step"]), dict(info["model"]), int(info["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{info_file} is damaged ({exc!r}); use an earlier checkpoint") from None
    return info
