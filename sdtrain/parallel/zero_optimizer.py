"""The optimizer over ZeRO's master shards, wherever its state lives: one role, three homes.

- `ResidentAdam`: torch's AdamW over the units' master shards in the device's memory (no
  offload; also `cpu` where there is no GPU, the state being in host memory already), or
  in pinned host memory beside a GPU (offload_optimizer `cpu`: ZeRO-Offload), gradients
  copied to the host and the fused CPU kernel stepping there.
- `OffloadedAdam` (offload/optimizer.py): the state in files (offload_optimizer `nvme`:
  ZeRO-Infinity), streamed through a few sub-group buffers.

Each takes units as ZeRO makes them (`adopt`; `ready` when all are in), steps all of them
with the units' unscaled, clipped fp32 gradient shards (`step`), shows checkpoints each
unit's master and moments (`unit_state`), DCP saving from them and loading into them in
place, and keeps AdamW's step count in one tensor for them (`step_count`). A master in
memory (unit.master) is cast into the weights by ZeRO (_publish_weights); one kept off
memory (unit.master None) goes to the weights sub-group by sub-group, by the optimizer
(`masters_to_weights` after a load).
"""

from __future__ import annotations

import torch

from sdtrain.parallel.flat_unit import FlatUnit
from sdtrain.parallel.strategy import ADAM_MOMENTS, adamw, init_adam_state


def zero_optimizer(cfg, train, device: torch.device, param_dtype: torch.dtype, store, weights_sink):
    """The optimizer parallel.zero (`cfg`) asks for: offload_optimizer nvme in `store` (the
    rank's offload files), cpu in host memory beside a GPU (on a machine without one, where
    everything is in host memory already, the same as none), or none."""
    separate_masters = param_dtype != torch.float32
    if cfg.offload_optimizer == "nvme":
        from sdtrain.parallel.offload.optimizer import OffloadedAdam

        # the step runs on the host: beside a GPU even fp32 weights get a master of their own, in the files
        return OffloadedAdam(train, store, cfg.sub_group_mb, cfg.buffer_count,
                             separate_masters or device.type != "cpu", weights_sink)
    host = cfg.offload_optimizer == "cpu" and device.type == "cuda"
    return ResidentAdam(train, separate_masters, host, cfg.pin_memory)


class ResidentAdam:
    offloaded = False  # its masters are unit.master, in memory

    def __init__(self, train, separate_masters: bool, host: bool = False, pin_memory: bool = True):
        """`separate_masters`: the fp32 masters are not the weights (bf16/fp16). `host`: keep
        masters and moments in (pinned) host memory and step there, beside a GPU
        (offload_optimizer cpu); the master is then separate even under fp32."""
        self.train, self.separate_masters, self.host, self.pin_memory = train, separate_masters, host, pin_memory
        self.units: list[FlatUnit] = []
        self.optimizer: torch.optim.AdamW | None = None

    def adopt(self, unit: FlatUnit) -> None:
        if self.host:  # a master of its own in host memory, fp32 or not
            master = torch.empty(unit.shard_size, dtype=torch.float32, pin_memory=self.pin_memory)
            unit.master = master.copy_(unit.master)
        self.units.append(unit)

    def ready(self) -> None:
        """AdamW over the units' master shards, split into decayed and not, each unit's Adam
        moments views of one flat tensor per moment (unit.moments, which checkpoints save)."""
        decay, no_decay = [], []
        for unit in self.units:
            with_decay, without = unit.decay_split()
            unit.views = [(unit.master[with_decay], with_decay), (unit.master[without], without)]
            unit.moments = {m: torch.zeros_like(unit.master) for m in ADAM_MOMENTS}
            for view, part in unit.views:
                if view.numel():
                    (decay if part is with_decay else no_decay).append(view)
        self.optimizer = adamw(decay, no_decay, self.train, self.units[0].master.device if self.units else
                               torch.device("cpu"))
        for unit in self.units:  # Adam moments are views of one flat tensor per unit
            for view, part in unit.views:
                if view.numel():
                    init_adam_state(self.optimizer, view, {m: t[part] for m, t in unit.moments.items()})

    @property
    def step_count(self) -> torch.Tensor:
        first = next(p for group in self.optimizer.param_groups for p in group["params"])
        return self.optimizer.state[first]["step"]

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        if self.host:  # the gradient shards to the host, all copies queued before the wait
            grads = [g.to("cpu", non_blocking=True) for g in grads]
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()
        for unit, grad in zip(self.units, grads):
            for view, part in unit.views:
                view.grad = grad[part]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        for unit in self.units:
            for view, _ in unit.views:
                view.grad = None

    def masters_to_weights(self) -> None:
        """Nothing: the masters are in memory, and ZeRO casts them into the weights."""

    def after_load(self) -> None:
        step = self.step_count
        for group in self.optimizer.param_groups:  # every optimizer view takes the loaded step count
            for p in group["params"]:
                if self.optimizer.state[p]["step"] is not step:
                    self.optimizer.state[p]["step"] = step.clone()

    def unit_state(self, unit: FlatUnit) -> dict[str, torch.Tensor]:
        return {"master": unit.master, **unit.moments}

    def resident(self) -> list[torch.Tensor]:
        """Optimizer state in the device's memory: the masters where separate, the moments
        (none of it when it lives on the host)."""
        if self.host:
            return []
        separate = [u.master for u in self.units] if self.separate_masters else []
        return separate + [t for u in self.units for t in u.moments.values()]

    def close(self) -> None:
        """Nothing to give back."""
