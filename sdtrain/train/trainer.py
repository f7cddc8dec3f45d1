"""The training loop: micro-batches, accumulation, clipping, LR schedule, eval, checkpoints.

Loss semantics: every micro-batch loss is a mean over its tokens and is divided by the
number of micro-batches per rank; data parallelism averages over ranks. The gradient is
therefore that of the mean loss over the whole global batch, whatever the split, which is
what makes a 4-rank run comparable to a 1-rank run step by step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sdtrain.batch import BatchPlan
from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.strategy import Strategy
from sdtrain.train.checkpoint import Checkpointer
from sdtrain.train.data import Batches
from sdtrain.train.faults import inject_fault, nan_loss_drill
from sdtrain.train.heap import HeapTrimmer
from sdtrain.train.hang_drill import inject_hang
from sdtrain.train.metrics import MetricsLog, memory_gib, peak_memory_gib
from sdtrain.train.nonfinite import StepGuard
from sdtrain.train.progress import mark_step
from sdtrain.train.schedule import lr_at

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    last_step: int
    final_loss: float = float("nan")
    eval_losses: list = field(default_factory=list)  # (step, loss)
    tokens_per_s: float = 0.0
    train_s: float = 0.0
    checkpoint: str | None = None
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient norm (on_nonfinite skip)
    overflow_steps: int = 0  # fp16: updates dropped for a gradient overflow (the loss scaler's, whole run)
    loss_scale: float | None = None  # fp16: the scale after the last step
    preempted: bool = False  # stopped early at a preemption request, after saving a checkpoint
    checkpoint_stall_s: list = field(default_factory=list)  # per save: how long training stood still


class Trainer:
    def __init__(
        self,
        recipe,
        env: DistEnv,
        strategy: Strategy,
        plan: BatchPlan,
        train_batches: Batches,
        val_batches: Batches,
        checkpointer: Checkpointer,
        flops_per_token: float,
        peak_flops: float | None,
        guard: StepGuard | None = None,
    ):
        self.recipe, self.env, self.strategy, self.plan = recipe, env, strategy, plan
        self.model = strategy.model
        self.train_batches, self.val_batches = train_batches, val_batches
        self.checkpointer = checkpointer
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.autocast_dtype = AUTOCAST_DTYPES.get(recipe.train.precision)
        self.state_bytes: dict[str, int] = {}
        self.tokens_per_step = plan.global_batch * recipe.model.seq_len
        self.guard = guard  # non-finite loss/gradients and preemption, decided before each update
        self.heap = HeapTrimmer(env.device)  # CPU: freed memory back to the system when the heap creeps
        if guard is not None:
            strategy.gate_updates(guard)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on global batch `step`; returns (this rank's sum of micro-batch
        losses, grad norm)."""
        mark_step(step)  # progress, for the node agent's hang watchdog
        inject_hang(self.env.rank, step)
        inject_fault(self.env.rank, step)
        self.model.train()
        micro_batches = list(self.train_batches.micro_batches(step, self.env.dp_rank, self.env.device))
        with nan_loss_drill(self.strategy, self.env.rank, step):
            loss_sum = self.strategy.forward_backward(micro_batches, self.autocast)
        if self.guard is not None:
            self.guard.begin(step, loss_sum)
        self.step_lr = self.lr(step)
        grad_norm = self.strategy.step(self.step_lr, self.recipe.train.grad_clip)
        if self.guard is not None:
            self.guard.after_step(grad_norm)
        self.heap.after_step()
        if not self.state_bytes:  # first step done: every piece of model state now exists
            self.state_bytes = self.strategy.state_bytes()
        return loss_sum, grad_norm

    def evaluate(self) -> float:
        self.model.eval()
        total, count = torch.zeros((), device=self.env.device), 0
        for index in range(self.recipe.train.eval_batches):
            micro_batches = list(self.val_batches.micro_batches(index, self.env.dp_rank, self.env.device))
            total += self.strategy.evaluate(micro_batches, self.autocast)
            count += len(micro_batches)
        loss = self.strategy.mean_loss(total, count)
        self.strategy.comm_bytes()  # an eval's collectives (ZeRO-3's gathers, TP's) are no training step's traffic
        return loss

    def fit(self, first_step: int, log: MetricsLog | None) -> TrainResult:
        train, ckpt = self.recipe.train, self.recipe.checkpoint
        result = TrainResult(last_step=first_step)
        if first_step == 0 and train.eval_every:
            result.eval_losses.append((0, self.evaluate()))  # the baseline the run improves on
            self.checkpointer.eval_baseline = result.eval_losses[0][1]  # a resumed launch reads it there
            if log is not None:
                log.note(f"step 0: eval {result.eval_losses[0][1]:.4f} (before training)")
        interval_start, interval_steps = time.perf_counter(), 0
        for step in range(first_step, train.steps):
            loss, grad_norm = self.train_step(step)
            done = step + 1
            interval_steps += 1
            eval_now = (train.eval_every and done % train.eval_every == 0) or done == train.steps
            if eval_now or done % self.recipe.log.every == 0:
                loss_value = self.strategy.mean_loss(loss, self.plan.grad_accum)  # also waits for the step
                elapsed = time.perf_counter() - interval_start
                tokens_per_s = interval_steps * self.tokens_per_step / elapsed
                record = {
                    "step": done,
                    "loss": loss_value,
                    "lr": self.step_lr,
                    "grad_norm": grad_norm.item(),
                    "step_s": round(elapsed / interval_steps, 4),
                    "tokens_per_s": tokens_per_s,
                    "mfu": self.mfu(tokens_per_s),
                    "mem_gib": memory_gib(self.env.device),
                    "comm_bytes": sum(self.strategy.comm_bytes().values()) // interval_steps,
                }
                record.update(self.strategy.log_metrics(record["mem_gib"]))
                if self.guard is not None and self.guard.skipped:
                    record["skipped_steps"] = self.guard.skipped
                if (scaler := self.strategy.loss_scaler) is not None:
                    record.update(loss_scale=scaler.scale, overflow_steps=scaler.skipped)
                if self.heap.trims:
                    record["heap_trims"] = self.heap.trims
                result.final_loss = loss_value
                result.train_s += elapsed
                if eval_now:
                    record["eval_loss"] = self.evaluate()
                    result.eval_losses.append((done, record["eval_loss"]))
                if log is not None:
                    log.log(record)
                interval_start, interval_steps = time.perf_counter(), 0  # eval time is not throughput
            if (ckpt.every and done % ckpt.every == 0) or (ckpt.at_end and done == train.steps):
                interval_start += self.save_checkpoint(done, result)  # neither is checkpoint time
            result.last_step = done
            if self.guard is not None and self.guard.preempt_now and done < train.steps:
                if not ckpt.every or done % ckpt.every:  # else saved just now
                    self.save_checkpoint(done, result)
                result.preempted = True
                break
        result.skipped_steps = self.guard.skipped if self.guard is not None else 0
        if (scaler := self.strategy.loss_scaler) is not None:
            result.overflow_steps, result.loss_scale = scaler.skipped, scaler.scale
        self.checkpointer.finish()  # an async save completes before the run ends
        self.strategy.finish()
        steps_run = result.last_step - first_step
        result.tokens_per_s = steps_run * self.tokens_per_step / result.train_s if result.train_s else 0.0
        return result

    def lr(self, step: int) -> float:
        """The schedule's learning rate for global batch `step`: under fp16 the schedule does
        not advance on steps skipped for an overflow (as DeepSpeed's lr scheduler)."""
        scaler = self.strategy.loss_scaler
        return lr_at(step - (scaler.skipped if scaler is not None else 0), self.recipe.train)

    def save_checkpoint(self, done: int, result: TrainResult) -> float:
        """Save at step `done`; returns how long training stood still for it."""
        paused = time.perf_counter()
        result.checkpoint = str(self.checkpointer.save(done, self.strategy, self.recipe.model.model_dump()))
        stall = time.perf_counter() - paused
        result.checkpoint_stall_s.append(round(stall, 4))
        return stall

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilization of the whole job, or None where no peak is known."""
        if not self.peak_flops:
            return None
        return self.flops_per_token * tokens_per_s / (self.peak_flops * self.env.world_size)

    def state_bytes_per_rank(self) -> list[dict[str, int]]:
        """Every rank's model-state bytes (params, grads, optimizer), as counted after step 1."""
        keys = ("params", "grads", "optimizer")
        rows = self._from_every_rank([float(self.state_bytes.get(k, 0)) for k in keys])
        return [{k: int(v) for k, v in zip(keys, row)} for row in rows]

    def peak_memory_per_rank(self, gib: float | None = None) -> list[float]:
        """Every rank's peak memory in GiB: so far, or as it measured `gib` earlier."""
        mine = peak_memory_gib(self.env.device) if gib is None else gib
        return [round(row[0], 3) for row in self._from_every_rank([mine])]

    def _from_every_rank(self, values: list[float]) -> list[list[float]]:
        """All ranks' `values`, in rank order (float64: byte counts stay exact)."""
        mine = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, mine)
        return [t.tolist() for t in gathered]
