"""ZeRO stages 1, 2 and 3 on flat buffers and three collectives.

Stage 1  optimizer state (fp32 master weights, Adam moments) is sharded: each rank updates
         its shard, then the new weights are all-gathered. Gradients accumulate whole on
         every rank and are reduce-scattered once per step, bucket by bucket while the
         last micro-batch's backward runs.
Stage 2  gradients are sharded too: as soon as backward has produced every gradient of a
         bucket, the bucket is reduce-scattered (asynchronously, overlapping the rest of
         backward when `overlap_comm`) into this rank's shard and the full gradients freed.
         Once per micro-batch.
Stage 3  weights are sharded too: each Transformer block's weights exist whole only from
         just before its forward until just after (and again for its backward), gathered
         by the hooks in zero3.py, which also prefetch the next block.

How parameters are laid into those flat units (blocks, buckets), their master shards under
bf16 and the model-state bytes that gives, and the optimizer over the shards: zero_units.py.

Where the fp32 masters and Adam moments live (device or host memory, or files: ZeRO-Offload and
ZeRO-Infinity's offload_optimizer) is the optimizer's business, zero_optimizer.py; stage 3's
weight shards off the device (offload_params), offload/params.py.

Under tensor parallelism each tp rank runs all of this over its own pieces (Ψ / T, plus the
tp-replicated weights), N being its dp group; what crosses tp is in zero_tp.py.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from sdtrain.parallel.comm import Comm
from sdtrain.parallel.expert_parallel import after_step, balancer_state, moe_layers, moe_metrics
from sdtrain.parallel.flat_unit import FlatUnit
from sdtrain.parallel.loss_scale import loss_scaler_for
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.offload.params import offload_weight_shards
from sdtrain.parallel.offload.store import offload_metrics
from sdtrain.parallel.placement import DENSE, Placements, axis_groups, squares_over_axes
from sdtrain.parallel.strategy import ADAM_MOMENTS, Strategy, clip_coefficient, sum_of_squares, tensor_bytes
from sdtrain.parallel.tp_traffic import TpTraffic
from sdtrain.parallel.zero3 import ParamGatherer
from sdtrain.parallel.zero_tp import sum_partial_shards
from sdtrain.parallel.zero_optimizer import zero_optimizer
from sdtrain.parallel.zero_units import build_units

if TYPE_CHECKING:
    from sdtrain.parallel.tensor_parallel import TensorParallelPlan


# Stages 2/3: reduce-scatters that may run at once behind backward, each holding a unit's
# whole gradients. Two keep the network busy while the next unit's gradients are copied
# in; more would only keep more whole gradients alive (the model's, at worst).
MAX_REDUCE_SCATTERS_IN_FLIGHT = 2


class Zero(Strategy):
    def __init__(self, model: nn.Module, stage: int, cfg, train, env: DistEnv, placements: Placements,
                 tp_plan: TensorParallelPlan | None = None, offload_store=None):
        """`cfg`: the recipe's parallel.zero section; `train`: its train section; `placements`:
        each parameter's (parallelize's), which says the group that shards it; `tp_plan`: under
        tensor parallelism, the model's (each tp rank shards its own pieces over env.dp_group);
        `offload_store`: the rank's offload files (offload/store.py), where nvme offload is set."""
        self.stage = stage
        self.tp_plan = tp_plan
        self.tp_traffic = TpTraffic(tp_plan) if tp_plan is not None else None
        self.env, self.model = env, model
        # bf16 and fp16 compute in their own dtype beside fp32 master shards (zero_units.py)
        self.param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision, torch.float32)
        self.comm = Comm(env.dp_group, overlap=cfg.overlap_comm)
        # Each group a parameter is replicated over shards it: "dp", and under expert
        # parallelism "edp" for the experts (the ranks holding the same ones).
        groups = axis_groups(env)
        self.comms = {"dp": self.comm, **{g: Comm(groups[g], overlap=cfg.overlap_comm)
                                          for g in {p.replicated_over for p in placements.values()} - {"dp"}}}
        # where the fp32 masters and Adam moments live (zero_optimizer.py): it takes each unit
        # as it is made, so an offloading one holds no more than one unit's master at a time
        self.offload_store, self.steps_since_metrics = offload_store, 0
        self.optimizer = zero_optimizer(cfg, train, env.device, self.param_dtype, offload_store, self._new_master_part)
        # stage 3 (ZeRO-Infinity): the weight shards off the device between gathers, each taken
        # off as its unit is made (offload/params.py)
        self.weight_shards = offload_weight_shards(cfg, offload_store, env.device) if stage == 3 else None
        built = build_units(model, stage, cfg, placements, self.comms, env, self.param_dtype, tp_plan,
                            self._adopt)
        self.units = built.units
        # stage 3's grouping, which its gatherer walks (empty at stages 1/2)
        self.block_units, self.root_units, self.persistent_unit = (built.block_units, built.root_units,
                                                                   built.persistent_unit)
        self.owner = {e.param: (unit, e) for unit in self.units for e in unit.entries}
        model.to(self.param_dtype)  # buffers, if any; the weights were re-homed by the units
        for layer in moe_layers(model).values():
            if layer.balancer is not None:
                layer.balancer.float()  # its bias moves in steps of 1e-3: fp32
        self.optimizer.ready()
        # fp16: backward starts from scale / dp and each reduced average is multiplied back by
        # dp, so every fp16 sum holds what one process's would (loss_scale.py)
        self.loss_scaler = loss_scaler_for(train, env.device, model, predivide=env.dp_size)
        self.reduced_factor = env.dp_size if self.loss_scaler is not None else 1
        self.pending: list = []  # in-flight reduce-scatters: (work, result, unit)
        self.in_last_micro_batch = False  # stage 1: this backward makes the step's final gradients
        self.spare_grad_buffers: list[torch.Tensor] = []  # stages 2/3: see _whole_grad_buffer
        for p in self.owner:
            p.register_post_accumulate_grad_hook(self._on_grad_ready if self.stage >= 2 else self._on_grad_final)
        self.gatherer = None
        if self.stage == 3:
            if self.weight_shards is not None:
                self.weight_shards.ready()
            if self.weight_shards is not None and self.optimizer.offloaded:
                self.weight_shards.hand_masters_to(self.optimizer)  # fp32: one copy on disk, stepped there
            self.gatherer = ParamGatherer(model, self.block_units, self.root_units, self.comm, cfg.prefetch_blocks,
                                          self.weight_shards)

    def _adopt(self, unit: FlatUnit) -> None:
        """A unit just made: its optimizer state, then (stage 3, offloaded) its weight shard, leave."""
        self.optimizer.adopt(unit)
        if self.weight_shards is not None:
            self.weight_shards.adopt(unit, optimizer_in_memory=not self.optimizer.offloaded)

    # --- backward ----------------------------------------------------------------------

    def _on_grad_ready(self, param: nn.Parameter) -> None:
        """Stage 2/3: move a finished gradient into its bucket; reduce-scatter a full bucket."""
        unit, e = self.owner[param]
        if unit.grad_full is None:
            unit.grad_full = self._whole_grad_buffer(unit.padded)
        unit.grad_full[e.offset : e.offset + e.numel].copy_(param.grad.reshape(-1))
        param.grad = None
        unit.waiting -= 1
        if unit.waiting == 0:
            self._reduce_scatter(unit)

    @contextlib.contextmanager
    def micro_batch(self, is_last: bool):
        self.in_last_micro_batch = is_last
        try:
            yield
        finally:
            self.in_last_micro_batch = False

    def _on_grad_final(self, param: nn.Parameter) -> None:
        """Stage 1, in the step's last micro-batch: reduce-scatter a bucket as soon as backward
        has added its last gradient, overlapping the rest of backward as DDP does, instead of
        all of them in step() (measured on bench-20m: ~120 ms of a ~650 ms step). Where no
        micro-batch says it is the last (a pipeline's replicas), step() reduces them all."""
        if not self.in_last_micro_batch:
            return
        unit, _ = self.owner[param]
        unit.waiting -= 1
        if unit.waiting == 0:
            self._reduce_scatter(unit)

    def _whole_grad_buffer(self, numel: int) -> torch.Tensor:
        """Stages 2/3: zeros for a unit's whole gradients, in a buffer a unit used before where
        one is as large. Kept (no more than can be in use at once) rather than freed: buffers
        made and freed every step grew the resident set past the heap trimmer's margin, which
        then trimmed after every step of bench-20m's ZeRO-2, and the next step faulted the
        pages back in."""
        for i, buffer in enumerate(self.spare_grad_buffers):
            if buffer.numel() == numel:
                return self.spare_grad_buffers.pop(i).zero_()
        return torch.zeros(numel, dtype=self.param_dtype, device=self.env.device)

    def _reduce_scatter(self, unit: FlatUnit) -> None:
        work, result = unit.comm.reduce_scatter(unit.grad_full, async_op=unit.comm.overlap)
        self.pending.append((work, result, unit))
        if self.gatherer is not None:
            self.gatherer.free(unit)  # its backward is done: the whole weights can go
        if self.stage >= 2:
            # Finish the oldest ones now, so that whole gradients exist for only a few
            # units at a time instead of for the whole model until backward ends.
            while len(self.pending) > MAX_REDUCE_SCATTERS_IN_FLIGHT:
                self._finish(*self.pending.pop(0))

    def backward(self, loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        """Backward from the loss, or (a pipeline chunk) from an output and its gradient; the
        gradients it makes are reduced before it returns, whoever called it how often."""
        loss.backward(grad)
        self._finish_backward()

    def grads_ready(self, params: list) -> None:
        """Gradients written outside autograd (a zero-bubble W pass): hand them on as the
        post-accumulate hooks would have, then reduce what they complete."""
        if self.stage >= 2:
            for param in dict.fromkeys(params):
                self._on_grad_ready(param)
        self._finish_backward()

    def _finish_backward(self) -> None:
        if self.stage == 1:
            return  # gradients accumulate whole; reduced once, in step()
        for unit in self.units:  # parameters that got no gradient this time count as zero
            if 0 < unit.waiting < len(unit.entries):
                unit.waiting = 0
                self._reduce_scatter(unit)
        self._drain()

    def _drain(self) -> None:
        for pending in self.pending:
            self._finish(*pending)
        self.pending.clear()

    def _finish(self, work, result: torch.Tensor, unit: FlatUnit) -> None:
        if work is not None:
            work.wait()
        unit.grad_shard.add_(result, alpha=self.reduced_factor)
        if self.stage >= 2:  # stage 1 keeps its whole-gradient buffer for the next step
            if len(self.spare_grad_buffers) <= MAX_REDUCE_SCATTERS_IN_FLIGHT:
                self.spare_grad_buffers.append(unit.grad_full)
            unit.grad_full = None
        unit.waiting = len(unit.entries)

    # --- step --------------------------------------------------------------------------

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        self.steps_since_metrics += 1
        if self.stage == 1:  # the step's one reduction of the whole accumulated gradients
            for unit in self.units:
                if unit.waiting:  # not reduced during backward
                    unit.waiting = 0
                    self._reduce_scatter(unit)
            self._drain()
        sum_partial_shards(self.tp_plan, [u.grad_shard for u in self.units if u.partial_over_tp])
        if self.tp_traffic is not None:
            self.tp_traffic.stepped()
        grads = [u.grad_shard.float() if self.param_dtype != torch.float32 else u.grad_shard for u in self.units]
        if self.loss_scaler is not None and self.loss_scaler.unscale(grads):  # fp16: the shards, in fp32
            self._clear_grads()  # an overflow on some rank: every rank skips
            return torch.tensor(float("inf"), device=self.env.device)
        # each weight once: its shards' squares over the group sharding it, then (a weight
        # sharded over axes, e.g. experts over ep) the pieces' over those axes
        partial = [(axes, self._squares([g for u, g in zip(self.units, grads) if u.reduction == (group, axes)],
                                        self.comms[group]))
                   for group, axes in dict.fromkeys([DENSE.reduction, *(u.reduction for u in self.units)])]
        squares = squares_over_axes(partial, axis_groups(self.env))
        if self.env.pp_size > 1:  # every stage's gradients count in the global norm
            dist.all_reduce(squares, group=self.env.pp_group)
        norm = squares.sqrt()[0]
        if not self.update_allowed(norm):
            self._clear_grads()
            return norm
        if grad_clip:
            coef = clip_coefficient(norm, grad_clip)
            for g in grads:
                g.mul_(coef)
        if self.weight_shards is not None and not self.optimizer.offloaded:
            self.weight_shards.load_masters()  # fp32: the offloaded shards are the masters it steps
        self.optimizer.step(grads, lr)
        self._publish_weights()
        self._clear_grads()
        after_step(self.model, self.env)
        return norm

    def _squares(self, grads: list[torch.Tensor], comm: Comm) -> torch.Tensor:
        """The sum of squares of these shards' gradients over the comm's group."""
        return comm.all_reduce_sum(sum_of_squares(grads, self.env.device).reshape(1))

    def _clear_grads(self) -> None:
        for unit in self.units:
            unit.grad_shard.zero_()
            if self.stage == 1:
                unit.grad_full.zero_()

    def add_grad(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Add `grad`, the same on every replica, to param's gradient: before the reduction
        at stage 1 (the average keeps it), to this rank's reduced shard at stages 2/3."""
        unit, e = self.owner[param]
        if self.stage == 1:
            param.grad += grad
            return
        lo, hi = max(e.offset, unit.shard_start), min(e.offset + e.numel, unit.shard_start + unit.shard_size)
        if lo < hi:
            part = grad.reshape(-1)[lo - e.offset : hi - e.offset]
            unit.grad_shard[lo - unit.shard_start : hi - unit.shard_start].add_(part, alpha=self.reduced_factor)

    def full_weight(self, param: torch.Tensor) -> torch.Tensor:
        """param's whole current value (stage 3 gathers it for the moment)."""
        unit, _ = self.owner[param]
        if self.gatherer is None or self.gatherer.gathered(unit):
            return param.detach()
        self.gatherer.gather(unit)
        value = param.detach().clone()
        self.gatherer.free(unit)
        return value

    def after_load(self) -> None:
        self.optimizer.after_load()
        self.optimizer.masters_to_weights()  # masters kept off memory: read back into the weights
        self._publish_weights()

    def _local_weights(self, unit: FlatUnit) -> torch.Tensor:
        """This rank's shard of unit's weights as forward reads them (stage 3: what is gathered)."""
        return unit.shard if self.stage == 3 else unit.own_slice(unit.full)

    def _new_master_part(self, unit: FlatUnit, master_part: torch.Tensor, start: int) -> None:
        """A stepped part of a master the optimizer keeps off memory -> the weights."""
        if self.weight_shards is not None and self.weight_shards.holds(unit):
            self.weight_shards.write_back_part(unit, master_part, start)
            return
        self._local_weights(unit)[start : start + master_part.numel()].copy_(master_part)

    def _publish_weights(self) -> None:
        """New master weights -> the weights forward reads: cast into the local shard, then
        all-gathered where whole weights are kept (stages 1/2, stage 3's persistent unit);
        stage 3 blocks gather theirs when they next run (any still whole, kept for a backward
        that did not come, is freed: its whole weights are the old ones)."""
        if self.gatherer is not None:
            self.gatherer.free_all()
        works = []
        for unit in self.units:
            if self.weight_shards is not None and self.weight_shards.holds(unit):
                self.weight_shards.write_back(unit)  # the block's next gather reads it from there
                continue
            local = self._local_weights(unit)
            # (a master kept off memory, None, went into the weights sub-group by sub-group)
            if unit.master is not None and local.data_ptr() != unit.master.data_ptr():
                local.copy_(unit.master)
            if self.stage < 3 or unit.name == "persistent":
                works.append(unit.comm.all_gather(unit.full, local, async_op=True))
        for work in works:
            work.wait()

    # --- checkpoints and accounting ----------------------------------------------------

    def checkpoint_state(self) -> dict:
        model, moments = dict(balancer_state(self.model)), {m: {} for m in ADAM_MOMENTS}
        for unit in self.units:
            state = self.optimizer.unit_state(unit)  # offloaded: views mapped onto the files
            master = state["master"]
            if self.weight_shards is not None and master is unit.master:  # the weights' own shard
                master = self.weight_shards.master_view(unit)
            model.update(unit.sharded(master, unit.mesh))
            for m in ADAM_MOMENTS:
                moments[m].update(unit.sharded(state[m], unit.mesh))
        return {"model": model, "optim": {**moments, "step": self.optimizer.step_count}}

    def state_bytes(self) -> dict[str, int]:
        if self.stage == 3:  # (offloaded shards are not held here)
            held = [u for u in self.units if self.weight_shards is None or not self.weight_shards.holds(u)]
            params = [u.shard for u in held] + [u.full for u in self.units if u.name == "persistent"]
        else:
            params = [u.full for u in self.units]
        grads = [u.grad_full if self.stage == 1 else u.grad_shard for u in self.units]
        return {"params": tensor_bytes(params), "grads": tensor_bytes(grads),
                "optimizer": tensor_bytes(self.optimizer.resident())}

    def comm_bytes(self) -> dict[str, int]:
        counted = self.comm.take_bytes()
        for comm in self.comms.values():
            if comm is not self.comm:
                for kind, size in comm.take_bytes().items():
                    counted[kind] = counted.get(kind, 0) + size
        if self.tp_traffic is not None:
            counted.update(self.tp_traffic.take())
        return counted

    def log_metrics(self, mem_gib: float) -> dict:
        moe = getattr(getattr(self.model, "cfg", None), "moe", None)
        metrics = moe_metrics(self.model, self.env, moe.num_experts) if moe else {}
        if self.tp_traffic is not None:
            metrics.update(self.tp_traffic.metrics())
        if self.offload_store is not None:  # per step since the last record
            metrics.update(offload_metrics(self.offload_store.counters.take(), self.steps_since_metrics))
            self.steps_since_metrics = 0
        return metrics

