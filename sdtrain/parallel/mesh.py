"""Process groups and the DeviceMesh every strategy is applied on.

The mesh has named axes, pipeline outermost: ("pp", "dp"), laid out as ParallelDims says
(rank = stage x dp + dp_rank). Every reduction names its group: gradients over "dp" (the
replicas of one stage), activations between neighbours along "pp", and the loss and global
gradient norm over every rank that holds a part of them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sdtrain.parallel.dims import ParallelDims


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    dims: ParallelDims
    tied_group: object = None  # first and last stage of this replica's pipeline (tied embedding/head)

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    @property
    def pp_group(self):
        return self.mesh.get_group("pp")

    @property
    def stage(self) -> int:
        return self.mesh.get_local_rank("pp")

    @property
    def pp_size(self) -> int:
        return self.dims.pp

    def pipeline_rank(self, stage: int) -> int:
        """The global rank of `stage` in this rank's pipeline (its data-parallel replica)."""
        return stage * self.dims.dp + self.dp_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.dims.pp - 1


def init_distributed(backend: str, timeout_s: int, pipeline_stages: int = 1) -> DistEnv:
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
    dims = ParallelDims(world, pipeline_stages)
    mesh = init_device_mesh(device.type, (dims.pp, dims.dp), mesh_dim_names=("pp", "dp"))
    env = DistEnv(rank, world, local_rank, device, mesh, dims)
    if dims.pp > 1:
        # Every rank creates every group, in the same order (new_group is collective).
        for dp_rank in range(dims.dp):
            ends = [dims.pipeline_ranks(dp_rank)[0], dims.pipeline_ranks(dp_rank)[-1]]
            group = dist.new_group(ends)
            if rank in ends:
                env.tied_group = group
    return env


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
