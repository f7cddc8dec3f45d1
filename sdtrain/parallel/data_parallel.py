"""ZeRO stage 0: plain data parallelism with DDP semantics. Every rank holds all weights,
gradients and optimizer state; gradients are averaged by DDP in buckets that overlap
backward. fp16's loss scaling is the one every strategy uses (loss_scale.py): torch's
GradScaler costs the same here (one unscale kernel and one sync per step) but decides on each
rank's own gradients, which under pipelining or tensor parallelism are not the whole model.

With tensor parallelism "all weights" are those of the rank's tp piece (whole norms and
position embedding beside its slices): DDP averages over the replicas of the same tp rank
(env.dp_group), the sequence-parallel partial gradients are summed over tp before the norm,
and the norm sums each placement's squares over the axes it is sharded over."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from sdtrain.estimate.buffers import AVERAGE_BUCKET_BYTES  # the estimate counts what this holds
from sdtrain.parallel.ddp_buckets import settle_buckets
from sdtrain.parallel.expert_parallel import after_step, balancer_state, moe_metrics, rank_local_buffers
from sdtrain.parallel.loss_scale import loss_scaler_for
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.placement import Placement, Placements, axis_groups, axis_sizes, squares_over_axes
from sdtrain.parallel.strategy import (
    ADAM_MOMENTS,
    Strategy,
    adamw,
    base_name,
    clip_coefficient,
    decays,
    init_adam_state,
    sum_of_squares,
    tensor_bytes,
)
from sdtrain.parallel.tp_traffic import TpTraffic

if TYPE_CHECKING:
    from sdtrain.parallel.tensor_parallel import TensorParallelPlan


class DataParallel(Strategy):
    def __init__(self, model: nn.Module, train, env: DistEnv, placements: Placements,
                 tp: TensorParallelPlan | None = None):
        """`tp`: tensor parallelism's plan where the model holds its pieces (DDP then averages
        over this tp rank's replicas, env.dp_group, as without it)."""
        self.env = env
        self.tp = tp
        self.tp_traffic = TpTraffic(tp) if tp is not None else None
        self.comm_counted = 0
        # Under a pipeline, a stage's forward runs one chunk at a time, which DDP's reducer
        # cannot follow: its replicas average their gradients once, in step().
        self.average_in_step = env.dp_size > 1 and env.pp_size > 1
        # DDP averages over "dp" only. Parameters replicated over another group (experts under
        # expert parallelism: the ranks holding the same ones) are averaged there, in step().
        elsewhere = [n for n, _ in model.named_parameters() if placements[base_name(n)].replicated_over != "dp"]
        if env.dp_size > 1 and not self.average_in_step:
            # nor may DDP broadcast rank 0's balancer load over the others' (after_step sums them)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, elsewhere + rank_local_buffers(model))
            model = DistributedDataParallel(
                model,
                device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                process_group=env.dp_group,
                gradient_as_bucket_view=True,  # grads live in the buckets: one copy fewer
            )
            model.register_comm_hook(self, _counting_allreduce)
            settle_buckets(model, [p for n, p in model.module.named_parameters() if n not in elsewhere])
        self.comm_counted = 0  # after settle_buckets: its all-reduce of zeros is no step's traffic
        self.model = model
        self.named = [(base_name(n), p) for n, p in self.plain.named_parameters()]
        self.placement = {p: placements[n] for n, p in self.named}
        # each group's parameters, "dp" first: the gradients step() averages over each group
        self.replicated: dict[str, list] = {"dp": []}
        for p, placement in self.placement.items():
            self.replicated.setdefault(placement.replicated_over, []).append(p)
        # each set of axes' parameters, unsharded first: the global norm sums their squares over them
        self.sharded: dict[tuple[str, ...], list] = {(): []}
        for p, placement in self.placement.items():
            self.sharded.setdefault(placement.sharded_over, []).append(p)
        params = [p for _, p in self.named]
        self.optimizer = adamw([p for p in params if decays(p)], [p for p in params if not decays(p)], train, env.device)
        for p in params:
            init_adam_state(self.optimizer, p, {m: torch.zeros_like(p) for m in ADAM_MOMENTS})
        self.loss_scaler = loss_scaler_for(train, env.device, self.plain, predivide=env.dp_size)

    def micro_batch(self, is_last: bool):
        """Skip DDP's all-reduce on every micro-batch but the last of a step."""
        if is_last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sizes, groups = axis_sizes(self.env), axis_groups(self.env)
        if self.tp is not None:  # before the norm: the sum over tp of sequence-parallel partial grads
            self.tp.sum_partial_grads(self.plain)
            self.tp_traffic.stepped()
        for group, params in self.replicated.items():
            if params and sizes[group] > 1 and (group != "dp" or self.average_in_step):
                self._average_grads(params, groups[group])
        if self.loss_scaler is not None and self.loss_scaler.unscale([p.grad for _, p in self.named], predivided=True):
            self.optimizer.zero_grad(set_to_none=False)  # an overflow on some rank: every rank skips
            return torch.tensor(float("inf"), device=self.env.device)
        if self.env.pp_size > 1 or len(self.sharded) > 1:
            norm = self._clip_over_pipeline(grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.plain.parameters(), grad_clip or float("inf"), foreach=True)
        if self.update_allowed(norm):
            self.optimizer.step()
        # Keep the gradient tensors (with DDP they are views of its buckets, which stay
        # allocated anyway): the memory is then visible to state_bytes().
        self.optimizer.zero_grad(set_to_none=False)
        after_step(self.plain, self.env)
        return norm

    def _average_grads(self, params: list, group) -> None:
        """Average the gradients over `group`: a large one in place, the small ones a bucket at
        a time through one flat copy. Flattening them all at once cost a pipeline's DDP step
        more than its all-reduce: the whole copy (48.7 MiB at bench-20m's pp2 x dp2) is past
        glibc's mmap threshold and faulted in afresh every step, ~40 ms of a 0.56 s step."""
        grads = [p.grad for p in params if p.grad is not None]
        for bucket in _average_buckets(grads):
            self.comm_counted += sum(g.numel() * g.element_size() for g in bucket)
            if len(bucket) == 1 and bucket[0].is_contiguous():
                dist.all_reduce(bucket[0], op=dist.ReduceOp.AVG, group=group)
                continue
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
            parts = flat.split([g.numel() for g in bucket])
            torch._foreach_copy_(bucket, [part.view_as(g) for g, part in zip(bucket, parts)])

    def _clip_over_pipeline(self, grad_clip: float) -> torch.Tensor:
        """The global norm counts every stage's gradients and every piece of a sharded weight
        (each weight once): the squares of each placement summed over the axes it is
        sharded over."""
        grads, partial = [], []
        for axes, params in self.sharded.items():
            mine = [p.grad for p in params if p.grad is not None]
            partial.append((axes, sum_of_squares(mine, self.env.device)))
            grads += mine
        squares = squares_over_axes(partial, axis_groups(self.env))
        if self.env.pp_size > 1:
            dist.all_reduce(squares, group=self.env.pp_group)
        norm = squares.sqrt()
        if grad_clip:
            torch._foreach_mul_(grads, clip_coefficient(norm, grad_clip).to(grads[0].dtype))
        return norm

    def add_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add `grad`, the same on every replica, to param's gradient (before averaging)."""
        param.grad += grad

    def full_weight(self, param: torch.Tensor) -> torch.Tensor:
        return param.detach()

    def checkpoint_state(self) -> dict:
        state = self.optimizer.state
        first = self.named[0][1]

        def saved(param: torch.Tensor, tensor: torch.Tensor):
            return self._as_whole(self.placement[param], tensor) if self.placement[param].shards else tensor

        return {
            "model": {**{n: saved(p, p) for n, p in self.named}, **balancer_state(self.plain)},
            "optim": {**{m: {n: saved(p, state[p][m]) for n, p in self.named} for m in ADAM_MOMENTS},
                      "step": state[first]["step"]},
        }

    def _as_whole(self, placement: Placement, local: torch.Tensor):
        """A rank's piece of a sharded weight as the whole tensor it is part of, a DTensor
        replicated over the placement's group and sharded along each of its axes (experts: the
        layer's whole [E, ...] tensor, sharded over "ep" along the expert index, replicated
        over "edp"), so DCP loads it at any layout. Pieces are even, as Shard places them; a
        piece of k parts (a fused q/k/v) is k boxes of the whole, which no Shard describes."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if any(s.pieces != 1 for s in placement.shards):
            return _as_boxes(placement, local.detach(), self.env.tp_mesh)
        names = (placement.replicated_over, *placement.sharded_over)
        mesh = self.env.expert_mesh if names == ("edp", "ep") else self.env.mesh[names]
        return DTensor.from_local(local.detach(), mesh, [Replicate(), *(Shard(s.dim) for s in placement.shards)],
                                  run_check=False)

    def log_metrics(self, mem_gib: float) -> dict:
        moe = getattr(getattr(self.plain, "cfg", None), "moe", None)
        metrics = moe_metrics(self.plain, self.env, moe.num_experts) if moe else {}
        if self.tp_traffic is not None:
            metrics.update(self.tp_traffic.metrics())
        return metrics

    def after_load(self) -> None:
        step = self.optimizer.state[self.named[0][1]]["step"]
        for _, p in self.named:
            self.optimizer.state[p]["step"] = step.clone()

    def comm_bytes(self) -> dict[str, int]:
        counted, self.comm_counted = self.comm_counted, 0
        return {"all_reduce": counted, **(self.tp_traffic.take() if self.tp_traffic is not None else {})}

    def state_bytes(self) -> dict[str, int]:
        params = [p for _, p in self.named]
        optim = [t for p in params for t in self.optimizer.state[p].values() if t.dim() > 0]
        return {"params": tensor_bytes(params), "grads": tensor_bytes(p.grad for p in params),
                "optimizer": tensor_bytes(optim)}


def _as_boxes(placement: Placement, local: torch.Tensor, mesh):
    """`local` as a DTensor of the whole tensor holding it as boxes (a LocalShardsWrapper,
    as flat_unit.py's ZeRO shards): DCP saves and loads each box at its offset in the whole
    and reads no placement; the boxes are views of `local`, so a load lands in place."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    boxes = placement.whole_boxes((0,) * local.dim(), tuple(local.shape))
    views = [local[tuple(slice(i, i + n) for i, n in zip(inner, size))] for _, inner, size in boxes]
    shape = torch.Size(placement.whole_shape(tuple(local.shape)))
    meta = TensorMeta(shape, torch.empty(shape, device="meta").stride(), local.dtype)
    return DTensor(LocalShardsWrapper(views, [tuple(at) for at, _, _ in boxes]),
                   DTensorSpec(mesh, (Shard(0),), tensor_meta=meta), requires_grad=False)


def _counting_allreduce(strategy: DataParallel, bucket):
    """DDP's own all-reduce of a gradient bucket, with its bytes counted."""
    tensor = bucket.buffer()
    strategy.comm_counted += tensor.numel() * tensor.element_size()
    return default_hooks.allreduce_hook(strategy.env.dp_group, bucket)


def _average_buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    buckets, current, filled = [], [], 0
    for g in grads:
        size = g.numel() * g.element_size()
        if size >= AVERAGE_BUCKET_BYTES:
            buckets.append([g])
            continue
        if current and filled + size > AVERAGE_BUCKET_BYTES:
            buckets.append(current)
            current, filled = [], 0
        current.append(g)
        filled += size
    return buckets + ([current] if current else [])
