"""What each rank may have, and whether the estimate fits in it.

CPU: the host's available memory, or its cgroup's limit less what the cgroup already uses
(v2 memory.max / memory.current, v1 memory.limit_in_bytes / memory.usage_in_bytes), the
smaller, shared by the node's workers. CUDA: each device's free memory. SDTRAIN_MEMORY_LIMIT
(e.g. 16GiB) stands for a node's memory where the machine's own would mislead (a test, a
job scheduler's allowance the container does not show).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import UserInputError

LIMIT_ENV = "SDTRAIN_MEMORY_LIMIT"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass(frozen=True)
class Budget:
    per_rank: float  # bytes each rank may have
    source: str  # where the number comes from, for messages

    def describe(self) -> str:
        return f"{self.per_rank / 2**30:.2f} GiB per rank ({self.source})"


def parse_bytes(text: str, what: str = LIMIT_ENV) -> int:
    """'16GiB', '16G', '1.5e10', '512M' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(?:i?B)?\s*", text or "", re.IGNORECASE)
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    except (AttributeError, ValueError):
        raise UserInputError(f"{what}={text!r} is not a size; e.g. 16GiB, 512M, 1.5e10") from None


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= NO_LIMIT else value


def cgroup_dirs() -> list[tuple[int, Path]]:
    """(version, directory) of this process's memory cgroup: v2's unified one, v1's memory
    controller; each also at the mount's root (a container sees its own cgroup there)."""
    found, root = [], CGROUP_ROOT
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            found.append((2, root / path.lstrip("/")))
        if "memory" in controllers.split(","):
            found.append((1, root / "memory" / path.lstrip("/")))
    found += [(2, root), (1, root / "memory")]
    return [(v, d) for v, d in found if d.is_dir()]


def cgroup_room() -> tuple[int, str] | None:
    """(bytes the memory cgroup still allows, which file says so), the tightest one."""
    best = None
    for version, folder in cgroup_dirs():
        names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit = _read_number(folder / names[0])
        if limit is None:
            continue
        room = limit - (_read_number(folder / names[1]) or 0)
        if best is None or room < best[0]:
            best = (room, f"cgroup v{version} limit {limit / 2**30:.1f} GiB ({folder / names[0]})")
    return best


def available_memory() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def host_room() -> tuple[float, str]:
    """(bytes this host's workers may have together, where that number comes from)."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        return parse_bytes(override), f"{LIMIT_ENV}={override}"
    room, source = available_memory(), "available memory"
    cgroup = cgroup_room()
    if cgroup is not None and cgroup[0] < room:
        room, source = cgroup
    return room, source


def cpu_budget(workers: int) -> Budget:
    """What each of this node's `workers` CPU workers may have."""
    room, source = host_room()
    return Budget(room / workers, f"{source}, shared by {workers} worker(s)")


def cuda_budget() -> Budget | None:
    """The smallest free memory of this machine's GPUs (None without CUDA)."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        return Budget(parse_bytes(override), f"{LIMIT_ENV}={override} per GPU")
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - a broken driver is preflight's to report, not this check's
        return None
    return Budget(free, "the smallest free memory of this machine's GPUs")


def node_budget(device: str, workers: int) -> Budget | None:
    return cuda_budget() if device == "cuda" else cpu_budget(workers)
