"""Process groups and the DeviceMesh every strategy is applied on.

The mesh has named axes so that later strategies (pipeline, expert parallel) add an axis
rather than a new kind of group bookkeeping; today it is a single "dp" axis.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.mesh.size(0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str, timeout_s: int) -> DistEnv:
    """Join the job started by the node agent (RANK, WORLD_SIZE, MASTER_* in the env)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistEnv(rank, world, local_rank, device, mesh)


def leave_process_group() -> None:
    """End a finished process: wait for every rank, destroy the process group, and exit
    without interpreter finalization. Something (the DeviceMesh, a peer's engine) can still
    hold the gloo group; its C++ threads would then be torn down during finalization, where
    destroying the tensors they hold needs the GIL and aborts the process with SIGABRT
    ("terminate called without an active exception", seen with torch 2.13 on CPU) after a
    successful run."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
