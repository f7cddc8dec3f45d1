"""ZeRO-Infinity's optimizer offload: each ZeRO unit's fp32 master shard (where it is separate
from the weights: bf16/fp16) and its Adam moments live in the rank's offload store, and the
step streams them through memory a sub-group at a time.

The step is torch's fused CPU AdamW kernel (`torch._fused_adamw_`, what AdamW(fused=True)
runs), called on each sub-group with the recipe's lr, betas, eps and the weight decay of the
part the sub-group lies in (matrices decay, vectors not: a sub-group never crosses that
boundary). The kernel is elementwise and sub-groups start at multiples of 1024 elements of
the tensors the in-memory optimizer steps, so every element goes through the same vector lane
as there, and the result is bitwise the in-memory one.

Sub-groups flow through `buffer_count` buffers: while sub-group k is stepped, k+1 (and up to
buffer_count - 2 more) is being read and k-1 written back, on the store's I/O threads; a
buffer is read into again only once its last sub-group's write is done. Resident: the
gradient shards (the caller's) and those buffers, not the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdtrain.parallel.flat_unit import FlatUnit
from sdtrain.parallel.offload.store import OffloadStore, Region
from sdtrain.parallel.offload.sub_groups import sub_group_numel
from sdtrain.parallel.strategy import ADAM_MOMENTS

# (unit, the stepped master's elements [start, start + len) of its shard, start) -> wherever
# the weights forward reads take them (cast into the resident shard, or offloaded weights)
WeightsSink = Callable[[FlatUnit, torch.Tensor, int], None]


@dataclass(frozen=True)
class SubGroup:
    unit: int  # index into OffloadedAdam.units
    start: int  # in the unit's shard
    numel: int
    weight_decay: float


class OffloadedAdam:
    offloaded = True  # its masters (where separate) and moments are in the store

    def __init__(self, train, store: OffloadStore, sub_group_mb: float, buffer_count: int,
                 separate_masters: bool, weights_sink: WeightsSink):
        """`train`: the recipe's train section (lr, betas, eps, weight decay);
        `separate_masters`: the fp32 masters are not the weights (bf16/fp16), so they go to the
        store too; `weights_sink`: where each stepped sub-group of such a master goes."""
        self.train, self.store, self.buffer_count = train, store, buffer_count
        self.separate_masters = separate_masters
        self.group_numel = sub_group_numel(sub_group_mb)
        self.weights_sink = weights_sink
        self.units: list[FlatUnit] = []
        self.regions: list[dict[str, Region]] = []  # per unit: "master" (if offloaded) and the moments
        self.regions_of: dict[FlatUnit, dict[str, Region]] = {}  # the same, by unit (units hash by identity)
        self.groups: list[SubGroup] = []
        self.step_count = torch.zeros((), dtype=torch.float32)  # AdamW's `step`, one for every view
        self.buffers: list[dict[str, torch.Tensor]] = []  # made as first needed, at most buffer_count
        self.most_in_flight = 0  # sub-groups holding a buffer at once (the tests' bound)

    def adopt(self, unit: FlatUnit) -> None:
        """Take a new unit's optimizer state into the store (as soon as the unit is made, so
        no more than one unit's master is ever whole in memory): Adam moments (zeros), and a
        separate master's first value, which leaves memory (unit.master becomes None). A master
        that is the weights (fp32) stays where they are and is stepped in place."""
        regions = {m: self.store.allocate(f"{unit.name}.{m}", unit.shard_size, torch.float32) for m in ADAM_MOMENTS}
        if self.separate_masters:
            regions["master"] = self.store.allocate(f"{unit.name}.master", unit.shard_size, torch.float32)
            self.store.write(regions["master"], unit.master.detach().to("cpu", torch.float32).contiguous())
            unit.master = None
        index = len(self.units)
        self.units.append(unit)
        self.regions.append(regions)
        self.regions_of[unit] = regions
        with_decay, without = unit.decay_split()
        for part, decay in ((with_decay, self.train.weight_decay), (without, 0.0)):
            for start in range(part.start, part.stop, self.group_numel):
                self.groups.append(SubGroup(index, start, min(self.group_numel, part.stop - start), decay))

    def master_in_store(self, unit: FlatUnit, region: Region) -> None:
        """unit's master is the weights' shard and has moved into `region` of the store (stage
        3's offloaded fp32 shards, offload/params.py): step it there."""
        self.regions_of[unit]["master"] = region

    def ready(self) -> None:
        """Every unit adopted (nothing to do: the sub-groups were cut as they came)."""

    # --- the step ------------------------------------------------------------------------

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        """One AdamW step over every unit: grads[i] is units[i]'s fp32 gradient shard,
        unscaled and clipped."""
        self.step_count += 1
        reads: dict[int, list] = {}
        writes: dict[int, list] = {}
        lookahead = max(1, self.buffer_count - 2)
        next_read = 0
        for k, group in enumerate(self.groups):
            while next_read < len(self.groups) and next_read <= k + lookahead:
                # the buffer's previous sub-group must be on disk before it is read into again
                for future in writes.pop(next_read - self.buffer_count, []):
                    self.store.wait(future)
                reads[next_read] = self._read(next_read)
                next_read += 1
                self.most_in_flight = max(self.most_in_flight, len(reads) + len(writes))
            for future in reads.pop(k):
                self.store.wait(future)
            state = self._stepped(k, grads[group.unit], lr)
            writes[k] = [self.store.write_async(self.regions[group.unit][kind], tensor, group.start)
                         for kind, tensor in state.items()]
        for futures in writes.values():
            for future in futures:
                self.store.wait(future)

    def _buffer(self, k: int) -> dict[str, torch.Tensor]:
        """Sub-group k's buffer: room for each kind of state some unit keeps in the store."""
        while len(self.buffers) <= k % self.buffer_count:
            if not self.buffers:  # the first step's: every unit adopted, every kind known
                self.buffer_kinds = list(dict.fromkeys(kind for regions in self.regions for kind in regions))
                self.buffer_numel = max(group.numel for group in self.groups)  # (units smaller than sub_group_mb)
            self.buffers.append({kind: torch.empty(self.buffer_numel, dtype=torch.float32)
                                 for kind in self.buffer_kinds})
        return self.buffers[k % self.buffer_count]

    def _read(self, k: int) -> list:
        group, buffer = self.groups[k], self._buffer(k)
        return [self.store.read_async(region, buffer[kind][: group.numel], group.start)
                for kind, region in self.regions[group.unit].items()]

    def _stepped(self, k: int, grad: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        """Step sub-group k, whose state is in its buffer; what goes back to the store."""
        group, buffer = self.groups[k], self._buffer(k)
        unit, regions = self.units[group.unit], self.regions[group.unit]
        span = slice(group.start, group.start + group.numel)
        state = {kind: buffer[kind][: group.numel] for kind in regions}
        master = state["master"] if "master" in regions else unit.master[span]
        grad = grad[span]
        if grad.device != master.device:  # beside a GPU the step runs on the host
            grad = grad.to(master.device)
        torch._fused_adamw_([master], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                            [self.step_count], amsgrad=False, lr=lr, beta1=self.train.beta1,
                            beta2=self.train.beta2, weight_decay=group.weight_decay, eps=self.train.eps,
                            maximize=False, grad_scale=None, found_inf=None)
        if unit.master is None:  # a separate master: the weights take its new value now
            self.weights_sink(unit, master, group.start)
        return state

    # --- after a checkpoint load, and checkpoints ----------------------------------------

    def masters_to_weights(self) -> None:
        """Every separate master -> the weights (after a load wrote new masters into the store)."""
        for group in self.groups:
            unit, regions = self.units[group.unit], self.regions[group.unit]
            if unit.master is None:
                part = self._buffer(0)["master"][: group.numel]
                self.store.read(regions["master"], part, group.start)
                self.weights_sink(unit, part, group.start)

    def after_load(self) -> None:
        """A load wrote the step count (one tensor) and the state in the store in place."""

    def unit_state(self, unit: FlatUnit) -> dict[str, torch.Tensor]:
        """unit's master and moments as checkpoints see them: mapped views of their regions
        (DCP saves from them and loads into them in place), or the resident master."""
        regions = self.regions_of[unit]
        state = {kind: self.store.mapped(region) for kind, region in regions.items()}
        state.setdefault("master", unit.master)
        return state

    def resident(self) -> list[torch.Tensor]:
        """Optimizer state kept in memory: none (the sub-group buffers are working space)."""
        return []

    def close(self) -> None:
        """The store is the rank's (close_all_stores ends it with the worker)."""
