"""Process groups and the DeviceMesh every strategy is applied on.

One world mesh, built from the Layout (as torchtitan's ParallelDims.build_mesh does), with
its axes in rank order: ("pp", "dp", "tp"), or ("pp", "edp", "ep", "tp") with expert
parallelism, where "dp" is the flattened ("edp", "ep"). Every other mesh is a slice of it,
so no group's ranks are written twice. Every reduction names its group: gradients over "dp"
(the replicas of one stage and tensor-parallel rank), activations between neighbours along
"pp", layer activations inside "tp", and the loss and global gradient norm over every rank
that holds a part of them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import cached_property
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sdtrain.parallel.join import join_process_group
from sdtrain.parallel.layout import Layout


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # the world mesh (layout.mesh_dims()); every group below is one of its axes
    layout: Layout
    tied_group: object = None  # first and last stage of this rank's pipeline (tied embedding/head)
    # Expert parallelism (ep > 1): the stage's replicas as ("edp", "ep"), dp_rank = edp x ep + ep_rank.
    # "ep": the ranks that split one set of experts among them (all-to-all); "edp": the ranks
    # that hold the same experts (their gradients are averaged there). Checkpoints place the
    # experts' DTensors on it.
    expert_mesh: DeviceMesh | None = None

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank_of(self.rank)

    @property
    def ep_group(self):
        return self.expert_mesh.get_group("ep") if self.expert_mesh is not None else None

    @property
    def edp_group(self):
        return self.expert_mesh.get_group("edp") if self.expert_mesh is not None else self.dp_group

    @property
    def edp_size(self) -> int:
        return self.layout.edp

    @property
    def edp_rank(self) -> int:
        return self.layout.edp_rank_of(self.rank)

    def edp_ranks(self, ep_rank: int | None = None) -> list[int]:
        """The global ranks holding the experts of `ep_rank` (this rank's), in edp order."""
        return self.layout.edp_ranks(self.stage, self.ep_rank if ep_rank is None else ep_rank, self.tp_rank)

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank_of(self.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    def dp_ranks(self) -> list[int]:
        """This rank's data-parallel group: its stage's replicas at its tensor-parallel rank."""
        return self.layout.dp_ranks(self.stage, self.tp_rank)

    @cached_property
    def tp_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this rank's tensor-parallel group (size 1 without tensor parallelism):
        what DTensor placements along "tp" go on. Sliced once: a slice is a new DeviceMesh."""
        return self.mesh["tp"]

    @property
    def tp_group(self):
        return self.mesh.get_group("tp")

    @property
    def tp_rank(self) -> int:
        return self.layout.tp_rank_of(self.rank)

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_group(self):
        return self.mesh.get_group("pp")

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    def pipeline_rank(self, stage: int) -> int:
        """The global rank of `stage` in this rank's pipeline (its data- and tensor-parallel slot)."""
        return self.layout.rank_of(stage, self.dp_rank, self.tp_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.pp - 1


def world_mesh(device_type: str, layout: Layout) -> DeviceMesh:
    """The one DeviceMesh of the job; with experts "dp" is flattened from ("edp", "ep"), so
    `mesh.get_group("dp")` is the same group either way."""
    sizes, names = layout.mesh_dims()
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=names)
    if layout.ep > 1:
        mesh["edp", "ep"]._flatten("dp")
    return mesh


def init_distributed(backend: str, timeout_s: int, layout: Layout | None = None) -> DistEnv:
    """Join the job started by the node agent (RANK, WORLD_SIZE, MASTER_* in the env) and
    build its meshes as `layout` says (default: every rank data parallel)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    layout = layout or Layout(world)
    if layout.world != world:
        raise RuntimeError(f"the layout is for {layout.world} ranks, but this job has WORLD_SIZE {world}")
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    join_process_group(backend, timedelta(seconds=timeout_s))  # the node agent's store: a private file on one node
    mesh = world_mesh(device.type, layout)
    env = DistEnv(rank, world, local_rank, device, mesh, layout)
    if layout.ep > 1:
        env.expert_mesh = mesh["edp", "ep"]
    # Every rank creates every group, in the same order (new_group is collective). Not a mesh
    # axis: only the two ends of each pipeline.
    for ends in layout.tied_pairs():
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
