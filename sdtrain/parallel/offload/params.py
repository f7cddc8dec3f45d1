"""ZeRO-Infinity's parameter offload: stage 3's weight shards live off the device between
gathers (`parallel.zero.offload_params`).

Each unit's shard (unit.shard, in the compute dtype; under fp32 also its master, the same
tensor) keeps its place in every structure that holds it (the optimizer's views of the master,
the gatherer, checkpoints), but its storage is resized to zero while it is off: the bytes are
in a region of the rank's offload store (`nvme`) or in a host copy (`cpu`, on a GPU). A gather
brings them back into that same storage, which is the staging buffer: read, all-gathered into
unit.full, and resized to zero again once the all-gather is done. The gatherer asks for a read
one block ahead of its gather prefetch, so reading block i+1 overlaps computing block i.

After the optimizer step the new shard goes back (`write_back`): cast from the fp32 master
where that is separate (bf16/fp16), the master itself under fp32. The writes run on the
store's I/O threads into the next forward; a unit's read first waits for its write (that
wait, like every wait on a read, is the step's exposed I/O time). Under fp32 the master must be
whole in memory while the optimizer steps it (`load_masters`), unless the optimizer reads it in
sub-groups itself (offload_optimizer nvme, the stepper's own pipeline).

The persistent unit (vectors under the persistence threshold, whole on every rank) is small
and stays resident: it is all-gathered once per step, never per block.
"""

from __future__ import annotations

from collections import deque

import torch

from sdtrain.parallel.flat_unit import FlatUnit


# Write-backs in flight at once: each holds its cast of a master until written, so more would
# hold more of the weights in memory again (all of them, unbounded, at the end of a step).
WRITES_IN_FLIGHT = 2


def _free(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(0)


def _restore(tensor: torch.Tensor) -> None:
    tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())


def _resident(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() > 0


class OffloadedShards:
    """The weight shards of stage-3 units off the device (see the module's docstring): in an
    offload store's regions (`store`, the rank's, whose counters carry these reads and writes
    into the step's metrics), or with `store` None in pinned host memory (`cpu` on a GPU)."""

    def __init__(self, store=None, pin_memory: bool = True):
        self.store, self.pin_memory = store, pin_memory
        self.regions = {}  # id(unit) -> where its shard lives: a store region, or a host tensor
        self.reads = {}  # id(unit) -> the future of a read into unit.shard
        self.reads_on_demand = 0  # gathers that found no read ahead of them (the root's, at a forward's start)
        self.stepping: set[int] = set()  # id(unit): fp32 masters loaded for an optimizer in memory to step
        self.writes: dict[int, list] = {}  # id(unit) -> futures of its writes in flight
        self.write_order: deque = deque()  # every write's future, oldest first (WRITES_IN_FLIGHT)
        self.free_when_written: set[int] = set()  # id(unit): a shard that is its own write's source
        self.units: list[FlatUnit] = []
        self.deferred: list[FlatUnit] = []  # fp32 masters an in-memory optimizer sets up on first

    def adopt(self, unit: FlatUnit, optimizer_in_memory: bool) -> None:
        """Take a new unit's shard off (as soon as the unit is made, so no more than one unit's
        shard is ever in memory at setup), unless it is the persistent unit, which stays. An
        fp32 shard is the master: an optimizer in memory makes its views of it first (ready)."""
        if unit.name == "persistent":
            return
        if optimizer_in_memory and unit.master is unit.shard:
            self.deferred.append(unit)
            return
        self._take_off(unit)

    def ready(self) -> None:
        """The optimizer is set up: the shards it needed in memory go off too."""
        for unit in self.deferred:
            self._take_off(unit)
        self.deferred.clear()

    def _take_off(self, unit: FlatUnit) -> None:
        if self.store is not None:
            self.regions[id(unit)] = self.store.allocate(f"{unit.name}.shard", unit.shard_size, unit.shard.dtype)
            self.store.write(self.regions[id(unit)], unit.shard)
        else:
            host = torch.empty(unit.shard_size, dtype=unit.shard.dtype, pin_memory=self.pin_memory)
            self.regions[id(unit)] = host.copy_(unit.shard)
        _free(unit.shard)
        self.units.append(unit)

    def holds(self, unit: FlatUnit) -> bool:
        return id(unit) in self.regions

    # --- the gatherer's side -----------------------------------------------------------

    def read_ahead(self, unit: FlatUnit) -> None:
        """Start reading unit's shard into its storage, unless it is there or on its way."""
        if not self.holds(unit) or id(unit) in self.reads:
            return
        self._settle_writes(unit, keep=True)  # (a shard just written from memory is there already)
        if _resident(unit.shard):
            return
        _restore(unit.shard)
        if self.store is None:  # on the copy's stream, ahead of the all-gather that reads it
            unit.shard.copy_(self.regions[id(unit)], non_blocking=True)
            return
        self.reads[id(unit)] = self.store.read_async(self.regions[id(unit)], unit.shard)

    def shard(self, unit: FlatUnit) -> torch.Tensor:
        """unit.shard with its bytes in it (waiting for its read, or reading it now)."""
        if not self.holds(unit):
            return unit.shard
        if id(unit) not in self.reads and not _resident(unit.shard) and id(unit) not in self.free_when_written:
            self.reads_on_demand += 1
        self.read_ahead(unit)
        future = self.reads.pop(id(unit), None)
        if future is not None:
            self.store.wait(future)
        return unit.shard

    def release(self, unit: FlatUnit) -> None:
        """The gather has its bytes: the staging storage goes (the file still holds them)."""
        if self.holds(unit) and id(unit) not in self.reads:
            _free(unit.shard)

    def drop_reads(self) -> None:
        """Before new shards are written: reads of the old ones are finished and let go, so
        no gather can use them (a read ahead for a block that did not run)."""
        for future in self.reads.values():
            self.store.wait(future)
        self.reads.clear()
        for unit in self.units:
            if id(unit) in self.free_when_written:
                self._settle_writes(unit)
        for unit in self.units:  # (an offloaded optimizer may have stepped the file under such a read)
            if _resident(unit.shard) and id(unit) not in self.stepping:
                _free(unit.shard)

    # --- the step's side ---------------------------------------------------------------

    def hand_masters_to(self, optimizer) -> None:
        """fp32 with the optimizer offloaded too (offload/optimizer.py): the masters it steps in
        sub-groups are these shards, in these regions; one copy on disk, not two."""
        for unit in self.units:
            if unit.master is unit.shard and self.store is not None:
                optimizer.master_in_store(unit, self.regions[id(unit)])

    def load_masters(self) -> None:
        """fp32 (the shard is the master): every master whole in memory for the optimizer."""
        for unit in self.units:
            if unit.master is unit.shard:
                self.read_ahead(unit)
        for unit in self.units:
            if unit.master is unit.shard:
                self.shard(unit)
                self.stepping.add(id(unit))

    def write_back(self, unit: FlatUnit) -> None:
        """The stepped master -> the unit's shard on disk. Under fp32 (the shard is the master)
        a master not in memory is already there (stepped there by an offloaded optimizer, or
        loaded there by a checkpoint); a master the optimizer keeps off memory too (None) sent
        each stepped sub-group here itself (write_back_part)."""
        if unit.master is None:
            return
        if unit.master is unit.shard:
            if id(unit) in self.stepping:
                self.stepping.discard(id(unit))
                self._write(unit, unit.shard)
                self.free_when_written.add(id(unit))
                if self.store is None:
                    self._settle_writes(unit)
            return
        self._write(unit, unit.master.to(unit.shard.dtype, copy=True))

    def write_back_part(self, unit: FlatUnit, master_part: torch.Tensor, start: int) -> None:
        """A stepped sub-group of unit's master (elements [start, start + len) of its shard) ->
        the shard on disk: for an optimizer that steps in sub-groups, so the weights follow each
        one instead of the whole master being read again."""
        self._write(unit, master_part.to(unit.shard.dtype, copy=True), start)

    def _write(self, unit: FlatUnit, value: torch.Tensor, start: int = 0) -> None:
        """value -> unit's shard from `start`: in flight on the store's threads (the pool's task
        holds value until it is written), or copied to the host shard now."""
        if self.store is None:
            self.regions[id(unit)][start : start + value.numel()].copy_(value)
            return
        future = self.store.write_async(self.regions[id(unit)], value, start)
        self.writes.setdefault(id(unit), []).append(future)
        self.write_order.append(future)
        while len(self.write_order) > WRITES_IN_FLIGHT:
            self.store.wait(self.write_order.popleft())

    def _settle_writes(self, unit: FlatUnit, keep: bool = False) -> None:
        """Wait for unit's writes; a shard that was their source can go now (`keep`: it stays,
        for the gather about to read it)."""
        for future in self.writes.pop(id(unit), []):
            self.store.wait(future)
        if id(unit) in self.free_when_written:
            self.free_when_written.discard(id(unit))
            if not keep:
                _free(unit.shard)

    def master_view(self, unit: FlatUnit) -> torch.Tensor:
        """fp32: unit's master as checkpoints see it, a view mapped onto its file region, which DCP
        saves from and loads into in place; loaded for a step, the master itself."""
        if unit.master is not unit.shard or id(unit) in self.stepping:
            return unit.master
        self._settle_writes(unit)
        if self.store is None:
            return self.regions[id(unit)]
        return self.store.mapped(self.regions[id(unit)])

    def resident(self) -> list[torch.Tensor]:
        """Shards of these units now in memory (reads in flight, staging not yet let go)."""
        return [u.shard for u in self.units if _resident(u.shard)]


def offload_weight_shards(cfg, store, device: torch.device) -> OffloadedShards | None:
    """Stage 3's weight shards off the device as `cfg` (parallel.zero) says: `nvme` in `store`;
    `cpu` in pinned host memory on a GPU, and on a machine without one nowhere else than they
    are (host memory already: the same as none)."""
    if cfg.offload_params == "nvme":
        if device.type != "cpu":
            raise NotImplementedError("offload_params nvme reads shards into host memory: on a GPU use "
                                      "offload_params cpu for now")
        return OffloadedShards(store)
    if cfg.offload_params == "cpu" and device.type == "cuda":
        return OffloadedShards(None, cfg.pin_memory)
    return None
