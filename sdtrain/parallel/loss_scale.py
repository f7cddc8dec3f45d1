"""fp16's loss scaling: one scaler for every strategy (DDP, ZeRO 1/2/3, pipeline stages,
experts, tensor-parallel pieces), with DeepSpeed's dynamic rule and knobs.

fp16 gradients underflow below 2^-24, so the loss is multiplied by the scale before backward
(Strategy.scaled; the MoE router's loss terms start their own gradient inside backward and
are scaled here too). Before the update each strategy hands this scaler the gradients it
holds (whole, a ZeRO shard, a stage's, a tp piece) to unscale; the kernel that divides also
notes any inf or NaN (GradScaler's), and ONE all-reduce (max) of that flag over the whole
world decides: every rank, stage, tp and ep rank skips the same steps, so no replica or stage
can step while another does not.

An overflowing step is skipped as DeepSpeed skips it: no optimizer update (Adam's step count
stays) and the learning-rate schedule does not advance (DeepSpeed steps its lr scheduler only
after an applied step): the trainer asks the schedule for step - `skipped`. The scale then
follows DeepSpeed's DynamicLossScaler: an overflow uses up one of `hysteresis` chances, the
last one halves the scale (never below min_scale); `window` steps after the last overflow the
scale doubles and the chances are restored. At min_scale an overflow that would lower it
further stops the run (DeepSpeed raises there too): the gradients overflow even unscaled, and
skipping for ever would train nothing. A static scale (`static`) never moves and never stops
the run; its overflowing steps are skipped all the same.

Overflows happen in fp16 values, so N data-parallel ranks overflow where one process does only
if they hold what it holds. A rank's loss is the mean over its M / N micro-batches, N times
one process's share of each: backward starts from scale / N (DeepSpeed's gradient pre-divide),
which makes every activation and weight gradient of a micro-batch the one process's. ZeRO
reduces fp16 gradients in fp16 and multiplies each reduced average back by N (zero.py), so its
partial sums and accumulated shards are the one process's too; DDP reduces fp32 gradients and
leaves the 1 / N for `unscale`. (Experts, averaged over edp, carry the same 1 / N.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class LossScaleError(RuntimeError):
    """fp16 overflowed with the scale already at its minimum (the same on every rank)."""


class LossScaler:
    def __init__(self, cfg, device: torch.device, model: nn.Module | None = None, predivide: int = 1):
        """`cfg`: the recipe's train.loss_scale; `model`: the rank's part, whose MoE layers'
        router loss terms follow the scale; `predivide`: the data-parallel size N, which
        backward's start is divided by (see above)."""
        self.predivide = predivide
        self.dynamic = not cfg.static
        self.scale = float(cfg.static or 2.0 ** cfg.initial_scale_power)
        self.window, self.hysteresis, self.min_scale = cfg.window, cfg.hysteresis, float(cfg.min_scale)
        self.device = device
        self.hysteresis_left = cfg.hysteresis
        self.iteration, self.last_overflow = 0, -1  # DeepSpeed's cur_iter, last_overflow_iter
        self.skipped = 0  # overflowing steps skipped in the whole run (resumed with the scale)
        self.routers = _router_bases(model) if model is not None else []
        self._follow()

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * (self.scale / self.predivide)

    def unscale(self, grads: list[torch.Tensor], predivided: bool = False) -> bool:
        """Divide `grads` by the scale in place (`predivided`: they still carry the pre-divide)
        and update the scale; True: the step overflowed on some rank and is to be skipped (the
        same answer on every rank)."""
        found = torch.zeros(1, dtype=torch.float32, device=self.device)
        factor = self.predivide if predivided else 1
        inverse = torch.full((1,), factor / self.scale, dtype=torch.float32, device=self.device)
        _overflow_drill(grads, self.iteration)
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            if g is not None:
                by_kind.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in by_kind.items():
            found_here = found if device == found.device else found.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here, inverse.to(device))
            if found_here is not found:
                found += found_here.to(found.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)  # the world's one decision
        overflow = bool(found.item())
        self.update(overflow)
        return overflow

    def update(self, overflow: bool) -> None:
        """DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis off)."""
        if overflow:
            self.skipped += 1
            if self.dynamic:
                if self.hysteresis == 1 or self.hysteresis_left == 1:
                    if self.scale <= self.min_scale:
                        raise LossScaleError(
                            f"fp16 gradients overflowed at step {self.iteration + 1} with the loss scale at "
                            f"train.loss_scale.min_scale ({self.min_scale:g}): they are not finite even unscaled, so "
                            "every step would be skipped. The run diverged: lower train.lr, or use precision bf16")
                    self.scale = max(self.scale / 2, self.min_scale)
                else:
                    self.hysteresis_left -= 1
            self.last_overflow = self.iteration
        elif self.dynamic and (self.iteration - self.last_overflow) % self.window == 0:
            self.hysteresis_left = self.hysteresis
            self.scale *= 2
        self.iteration += 1
        self._follow()

    def _follow(self) -> None:
        """The router loss terms' gradient is started inside backward (AddAuxLoss) with the
        layer's loss_scale: it carries the scale as the main loss's does."""
        for layer, base in self.routers:
            layer.loss_scale = base * self.scale / self.predivide

    def state_dict(self) -> dict:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "iteration": self.iteration,
                "last_overflow": self.last_overflow, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state["hysteresis_left"])
        self.iteration, self.last_overflow = int(state["iteration"]), int(state["last_overflow"])
        self.skipped = int(state["skipped"])
        self._follow()

    def load_extra_state(self, state: dict) -> None:
        """A checkpoint's scaler: ours, or (older checkpoints) torch's GradScaler, whose
        scale carries over and whose other counters do not map onto DeepSpeed's."""
        if "loss_scale" in state:
            self.load_state_dict(state["loss_scale"])
        elif "scaler" in state and self.dynamic:
            self.scale = float(state["scaler"]["scale"])
            self._follow()


def loss_scaler_for(train, device: torch.device, model: nn.Module, predivide: int = 1) -> LossScaler | None:
    """The rank's scaler under fp16; None otherwise (bf16 has fp32's exponent range)."""
    return LossScaler(train.loss_scale, device, model, predivide) if train.precision == "fp16" else None


def _overflow_drill(grads: list[torch.Tensor], step: int) -> None:
    """SDTRAIN_INJECT_OVERFLOW (train/faults.py): an inf in this rank's gradients only."""
    from sdtrain.train.faults import drill_fires

    rank = dist.get_rank() if dist.is_initialized() else 0
    first = next((g for g in grads if g is not None and g.numel()), None)
    if first is not None and drill_fires("SDTRAIN_INJECT_OVERFLOW", rank, step):
        first.view(-1)[0] = float("inf")


def _router_bases(model: nn.Module) -> list[tuple[nn.Module, float]]:
    from sdtrain.parallel.expert_parallel import moe_layers

    return [(layer, layer.loss_scale) for layer in moe_layers(model).values()]
