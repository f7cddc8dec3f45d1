"""The launch plan: which nodes, how many workers each, and who is rank 0's host.

Pure data, no torch: the CLI builds and prints it (`--dry-run`) before anything starts.
Ranks are assigned node by node in plan order, local ranks in slot order.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from sdtrain.errors import UserInputError
from sdtrain.parallel.layout import Layout


@dataclass(frozen=True)
class Node:
    host: str
    slots: tuple[int, ...]  # local device ids this node's workers use, in local-rank order
    node_rank: int


@dataclass
class LaunchPlan:
    nodes: list[Node]
    master_addr: str
    master_port: int
    backend: str
    run_id: str
    launcher: str = "local"  # the runner that starts the node agents (runners.py)
    commands: list[list[str]] = field(default_factory=list)  # one argv per node, filled by a runner
    # Variables a local launch adds for the node agents it starts (.sdtrain_env's); remote
    # nodes get theirs inside their command.
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return sum(len(node.slots) for node in self.nodes)

    def placement(self, layout: Layout | None = None) -> list[dict]:
        """Every rank: where it runs (node, local rank, device) and its coordinates in the
        parallel layout (pipeline stage, data-parallel rank, tensor-parallel rank, expert group)."""
        layout = layout or Layout(self.world_size)
        rows, rank = [], 0
        for node in self.nodes:
            for local_rank, slot in enumerate(node.slots):
                rows.append({"host": node.host, "node_rank": node.node_rank, "local_rank": local_rank,
                             "rank": rank, "device": slot, **layout.coordinates(rank)})
                rank += 1
        return rows


def resolve_nproc(requested, backend: str) -> int:
    """'auto' is one worker per visible GPU, or one on a CPU-only machine."""
    if requested != "auto":
        return int(requested)
    gpus = visible_gpu_count()
    if backend == "nccl" and gpus == 0:
        raise UserInputError("launch.backend nccl needs GPUs, and none are visible; use backend gloo or auto")
    return gpus if gpus and backend != "gloo" else 1


def visible_gpu_count() -> int:
    """GPUs this process may use, without importing torch (the CLI must start fast)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if visible_gpu_count() else "gloo"
