"""Process groups and the DeviceMesh every strategy is applied on.

The mesh has named axes, pipeline outermost: ("pp", "dp"), laid out as ParallelDims says
(rank = stage x dp + dp_rank); with expert parallelism a second mesh splits "dp" into
("edp", "ep"). Every reduction names its group: gradients over "dp" (the
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
from sdtrain.parallel.join import join_process_group


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    dims: ParallelDims
    tied_group: object = None  # first and last stage of this replica's pipeline (tied embedding/head)
    # Expert parallelism (ep > 1): the stage's replicas as ("edp", "ep"), dp_rank = edp x ep + ep_rank.
    # "ep": the ranks that split one set of experts among them (all-to-all); "edp": the ranks
    # that hold the same experts (their gradients are averaged there).
    expert_mesh: DeviceMesh | None = None

    @property
    def ep_size(self) -> int:
        return self.dims.ep

    @property
    def ep_rank(self) -> int:
        return self.expert_mesh.get_local_rank("ep") if self.expert_mesh is not None else 0

    @property
    def ep_group(self):
        return self.expert_mesh.get_group("ep") if self.expert_mesh is not None else None

    @property
    def edp_group(self):
        return self.expert_mesh.get_group("edp") if self.expert_mesh is not None else self.dp_group

    @property
    def edp_size(self) -> int:
        return self.dims.dp // self.dims.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.dims.ep

    def edp_ranks(self, ep_rank: int | None = None) -> list[int]:
        """The global ranks holding the experts of `ep_rank` (this rank's), in edp order."""
        base = self.stage * self.dims.dp + (self.ep_rank if ep_rank is None else ep_rank)
        return [base + j * self.dims.ep for j in range(self.edp_size)]

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


def init_distributed(backend: str, timeout_s: int, pipeline_stages: int = 1, expert_parallel: int = 1) -> DistEnv:
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
    join_process_group(backend, timedelta(seconds=timeout_s))  # the node agent's store: a private file on one node
    dims = ParallelDims(world, pipeline_stages, expert_parallel)
    mesh = init_device_mesh(device.type, (dims.pp, dims.dp), mesh_dim_names=("pp", "dp"))
    env = DistEnv(rank, world, local_rank, device, mesh, dims)
    if dims.ep > 1:
        experts = init_device_mesh(device.type, (dims.pp, dims.dp // dims.ep, dims.ep),
                                   mesh_dim_names=("pp", "edp", "ep"))
        env.expert_mesh = experts["edp", "ep"]
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
