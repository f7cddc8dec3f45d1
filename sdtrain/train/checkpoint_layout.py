"""The on-disk layout of a run's checkpoints, readable without torch (the launcher checks
a resume target before it starts anything)."""

from __future__ import annotations

import json
from pathlib import Path

from sdtrain.errors import CheckpointError

LATEST = "latest"
INFO = "sdtrain.json"
MAX_INFO_BYTES = 1 << 20  # sdtrain.json is a few hundred bytes; it is read whole, so bound it


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    with open(pointer, "rb") as f:  # a step folder's name; never read a larger file whole
        name = f.read(256).decode(errors="replace").strip()
    if Path(name).name != name or name in ("", ".", ".."):  # a checkpoint of this run, not a path out of it
        return None
    path = checkpoint_dir(run_dir) / name
    return path if (path / INFO).is_file() else None


def step_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints/step_<N> folders, newest first (partial saves left out)."""
    root = checkpoint_dir(run_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")), reverse=True)


def identity(path: Path) -> tuple[str, int, int]:
    """Which checkpoint is at `path`: its place and its folder (device, inode). A checkpoint
    saved again at the same step is renamed into place from a new folder: another checkpoint."""
    try:
        st = Path(path).stat()
    except OSError:
        return str(path), -1, -1  # gone
    return str(path), st.st_dev, st.st_ino


def read_info(path: Path) -> dict:
    """The sdtrain.json of a checkpoint; CheckpointError if it is not a complete checkpoint."""
    info_file = Path(path) / INFO
    if not info_file.is_file():
        raise CheckpointError(
            f"{path} is not an sdtrain checkpoint (no {INFO}); point at a checkpoints/step_<N> "
            "folder, or a run directory with checkpoints/latest"
        )
    if info_file.stat().st_size > MAX_INFO_BYTES:
        raise CheckpointError(f"{info_file} is {info_file.stat().st_size} bytes, not checkpoint information "
                              "(the file may be corrupt or crafted); use an earlier checkpoint")
    try:
        info = json.loads(info_file.read_text())
        int(info["step"]), dict(info["model"]), int(info["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{info_file} is damaged ({exc!r}); use an earlier checkpoint") from None
    return info
