"""Pipeline parallelism: this rank's chunks of the model, run by a schedule over a step's
micro-batches; the stage's data-parallel replicas (DDP semantics or ZeRO) inside.

The executor walks this rank's actions (schedules.py) in order. A forward receives its
input from the previous chunk's rank (or reads the micro-batch on the first chunk), runs the
chunk and sends the output on; the last chunk computes the loss. A backward receives the
gradient of its output (or starts from the loss), runs autograd through the chunk and sends
the gradient of its input back. Sends are asynchronous, and receives are posted P x V passes
ahead (one round of the schedule): gloo moves a message only once its receive is posted, so
a receive posted just one pass ahead left a finished send waiting for the receiver's CPU
(on a busy 2-core machine that was 5 % of an interleaved step, 3 % with the window). Both
are matched by tag (kind, chunk, micro-batch), so no schedule can deadlock on message order;
the window costs at most P x V boundary-sized buffers allocated early.

Under tensor parallelism each stage's layers are split over its tp ranks, and a pipeline is
one (dp rank, tp rank) slot across the stages (Layout.pipeline_ranks): tp rank r sends to tp
rank r of the next stage, its part of the sequence under sequence parallelism ([micro, T / tp,
d_model]), the whole activations otherwise (equal on the tp ranks). The tp ranks of a stage run
the same schedule, so their collectives inside a pass meet in the same order.

The tied embedding/head lives on the first and the last stage (tied_head.py). Every
reduction names its group: gradients over the stage's data-parallel replicas, the global
gradient norm over the pipeline too, the loss from the last stage to everyone.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn

from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.partition import chunk_count, chunks_of_rank
from sdtrain.parallel.schedules import bubble_formula, build_schedule, replay
from sdtrain.parallel.strategy import Strategy
from sdtrain.parallel.tied_head import TiedHead
from sdtrain.parallel.tp_collectives import TensorParallel
from sdtrain.parallel.weight_grads import DeferredWeightGrads

REPLAYED_STEPS = 100  # a logging interval's last steps the replay covers (log.every may be large)


class Pipeline(Strategy):
    def __init__(self, model: nn.Module, pipeline, env: DistEnv, micro_batches: int, partition: list[list[int]],
                 build_replicas, tp: TensorParallel | None = None):
        """`pipeline`: the recipe's parallel.pipeline section; `partition`: each chunk's blocks
        (partition_layers), the one the model's stage was built from; `tp`: the tensor-parallel
        group the model was split over (apply_tensor_parallel), if any."""
        self.env, self.model, self.tp = env, model, tp
        self.chunks = chunk_count(pipeline)
        self.stages = pipeline.stages
        self.layers = {c: [str(i) for i in partition[c]] for c in chunks_of_rank(env.stage, pipeline)}
        self.tied = TiedHead(model, env, self.chunks - 1 in self.layers, 0 in self.layers, tp)
        self.inner = build_replicas(model)  # DataParallel or Zero over this stage's replicas
        self.tied.start(self.inner)
        self.schedule = build_schedule(pipeline.schedule, pipeline.stages, pipeline.virtual_stages, micro_batches)
        self.actions = self.schedule[env.stage]
        self.bubble_formula = bubble_formula(pipeline.schedule, pipeline.stages, pipeline.virtual_stages, micro_batches)
        self.eval_actions = [(c, m) for c in sorted(self.layers) for m in range(micro_batches)]
        self.dtype = next((p.dtype for p in self.inner.plain.parameters()), torch.float32)
        self.split = None  # zero bubble: backward in two passes (weight_grads.py)
        if pipeline.schedule == "zero_bubble":
            self.split = DeferredWeightGrads(model, skip=(model.lm_head,) if model.lm_head is not None else ())
        self.busy_s = self.step_s = 0.0  # compute time and wall time of the steps since the last report
        # each action's compute time, per step since then (the last REPLAYED_STEPS of them)
        self.action_s: deque[list[float]] = deque(maxlen=REPLAYED_STEPS)
        self.posted: dict[tuple, tuple] = {}  # receives started ahead: (kind, chunk, m) -> (work, buffer)
        # this rank's (all, tensor-parallel) bytes of the steps up to the last comm_bytes call
        self.comm_taken, self.steps_since_taken, self.steps = (0, 0), 0, 0

    # --- one step ------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list, autocast) -> torch.Tensor:
        started = time.perf_counter()
        # (chunk, m) -> (input, output or loss / M, records); ("W", chunk, m) -> what W needs
        self.saved: dict[tuple, tuple] = {}
        self.sends, self.loss_sum = [], torch.zeros((), device=self.env.device)
        run = {"F": self._forward, "B": self._backward, "W": self._weights}
        costs = [0.0] * len(self.actions)
        self.action_s.append(costs)
        for action in self.actions[:self.chunks]:
            self._post_receive(action.kind, action.chunk, action.micro_batch, micro_batches)
        for i, action in enumerate(self.actions):
            if i + self.chunks < len(self.actions):  # later passes' inputs travel while this one computes
                following = self.actions[i + self.chunks]
                self._post_receive(following.kind, following.chunk, following.micro_batch, micro_batches)
            busy = self.busy_s
            run[action.kind](action.chunk, action.micro_batch, micro_batches, autocast)
            costs[i] = self.busy_s - busy
        for work in self.sends:
            work.wait()
        self.step_s += time.perf_counter() - started
        return self.loss_sum

    def _forward(self, chunk: int, m: int, micro_batches: list, autocast) -> None:
        x = micro_batches[m][0] if chunk == 0 else self._receive("F", chunk, m, micro_batches)
        if chunk == self.chunks - 1:
            self.tied.settle()  # the head has the embedding's latest value
        started = time.perf_counter()
        recording = self.split is not None and chunk > 0
        if recording:
            self.split.start_recording()
        with autocast():
            y = self.model(x, layers=self.layers[chunk])
            if chunk == self.chunks - 1:
                loss = self.inner.plain.loss(y, micro_batches[m][1])
                self.loss_sum += loss.detach().float()
                y = self.inner.scaled(loss / len(micro_batches))  # backward starts here: the mean over M
        records = self.split.stop_recording() if recording else None
        self.busy_s += time.perf_counter() - started
        self.saved[chunk, m] = (x, y, records)
        if chunk < self.chunks - 1:
            self.sends.append(self._send("F", chunk + 1, m, y.detach()))

    def _backward(self, chunk: int, m: int, micro_batches: list, autocast) -> None:
        x, y, records = self.saved.pop((chunk, m))
        grad = None if chunk == self.chunks - 1 else self._receive("B", chunk, m, micro_batches)
        started = time.perf_counter()
        if records is None:
            self.inner.backward(y, grad)
            input_grad = x.grad
        else:  # zero bubble: the input's gradient now, the weights' in W
            input_grad, self.saved["W", chunk, m] = self._input_grad(records, x, y, grad)
        self.busy_s += time.perf_counter() - started
        if chunk > 0:
            self.sends.append(self._send("B", chunk - 1, m, input_grad))

    def _weights(self, chunk: int, m: int, micro_batches: list, autocast) -> None:
        """W: the weight gradients B left for later (none on the first chunk: its B was whole)."""
        pending = self.saved.pop(("W", chunk, m), None)
        if pending is not None:
            started = time.perf_counter()
            touched = self.split.weight_grads(pending)
            head = self.model.lm_head
            if chunk == self.chunks - 1 and head is not None and isinstance(head.weight, nn.Parameter):
                touched.append(head.weight)  # an untied head's gradient, made in B with the loss
            self.inner.grads_ready(touched)
            self.busy_s += time.perf_counter() - started

    def _input_grad(self, records: list, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None):
        """B of a split backward: the gradient of the chunk's input (and of the tied head,
        made with the loss); returns it and what W needs."""
        head = self.model.lm_head.weight if grad is None and self.model.lm_head is not None else None
        wanted = [x] + ([head] if head is not None and head.requires_grad else [])
        grads, pending = self.split.input_grads(records, y, grad, wanted)
        if len(grads) > 1 and grads[1] is not None:
            head.grad = grads[1] if head.grad is None else head.grad + grads[1]
        return grads[0], pending

    @torch.no_grad()
    def evaluate(self, micro_batches: list, autocast) -> torch.Tensor:
        sends, total = [], torch.zeros((), device=self.env.device)
        self.tied.settle()
        for chunk, m in self.eval_actions:
            x = micro_batches[m][0] if chunk == 0 else self._receive("F", chunk, m, micro_batches)
            with autocast():
                y = self.model(x, layers=self.layers[chunk])
                if chunk == self.chunks - 1:
                    total += self.inner.plain.loss(y, micro_batches[m][1]).float()
            if chunk < self.chunks - 1:
                sends.append(self._send("F", chunk + 1, m, y))
        for work in sends:
            work.wait()
        return total

    def mean_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        """Only the last stage has the loss: every rank gets its mean over all replicas. Each
        tp rank of a replica holds the same whole loss (vocab_parallel_cross_entropy)."""
        value = loss_sum.detach().float().clone() / count
        if self.chunks - 1 not in self.layers:
            value.zero_()
        dist.all_reduce(value)
        return value.item() / (self.env.dp_size * self.env.tp_size)

    @property
    def loss_scaler(self):
        """fp16: the stage's replicas' scaler; its overflow flag is reduced over every stage."""
        return self.inner.loss_scaler

    def gate_updates(self, gate) -> None:
        self.inner.gate_updates(gate)  # the replicas' step holds the global norm

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        self.steps += 1
        started = time.perf_counter()
        self.tied.reduce_grads(self.inner)
        # The first and last stage meet here: the last waits for the first's final backward.
        # That wait is the end of its bubble, so it counts in the step's timeline.
        self.step_s += time.perf_counter() - started
        norm = self.inner.step(lr, grad_clip)
        self.tied.publish_weights(self.inner)
        return norm

    # --- point to point ------------------------------------------------------------------

    def _peer(self, chunk: int) -> int:
        return self.env.pipeline_rank(chunk % self.stages)

    def _tag(self, kind: str, chunk: int, m: int) -> int:
        return (chunk * 4096 + m) * 2 + (kind == "B")

    def _send(self, kind: str, to_chunk: int, m: int, tensor: torch.Tensor):
        """Forward: the output of chunk to_chunk - 1 to the rank of to_chunk. Backward: the
        gradient of chunk to_chunk + 1's input to the rank of to_chunk."""
        return dist.isend(tensor.contiguous(), self._peer(to_chunk), tag=self._tag(kind, to_chunk, m))

    def _post_receive(self, kind: str, chunk: int, m: int, micro_batches: list) -> None:
        """Start receiving what pass (kind, chunk, m) needs, if it needs anything: F the
        previous chunk's output, B the gradient of its own output (both [micro, T, d_model],
        or [micro, T / tp, d_model] under sequence parallelism: each tp rank's part of the
        sequence goes to the same tp rank of the next stage)."""
        if kind == "W" or (kind, chunk, m) in self.posted or chunk == (0 if kind == "F" else self.chunks - 1):
            return
        micro, length = micro_batches[m][0].shape
        if self.tp is not None and self.tp.sequence_parallel:
            length //= self.tp.size
        shape = (micro, length, self.model.cfg.d_model)
        buffer = torch.empty(shape, dtype=self.dtype, device=self.env.device)
        source = chunk - 1 if kind == "F" else chunk + 1
        work = dist.irecv(buffer, self._peer(source), tag=self._tag(kind, chunk, m))
        self.posted[kind, chunk, m] = (work, buffer)

    def _receive(self, kind: str, chunk: int, m: int, micro_batches: list) -> torch.Tensor:
        self._post_receive(kind, chunk, m, micro_batches)
        work, buffer = self.posted.pop((kind, chunk, m))
        work.wait()
        return buffer.requires_grad_() if kind == "F" and torch.is_grad_enabled() else buffer

    # --- the rest is the replicas' -------------------------------------------------------

    def log_metrics(self, mem_gib: float) -> dict:
        """The bubble: each stage's idle share of the steps since the last record, from its
        own timeline (time spent computing against the steps' wall time; waiting for a
        neighbour is idle), averaged over the stage's replicas, beside the schedule's formula
        and its replay: the schedule run again on each of these steps' own compute times with
        free communication. The formula assumes equal stages and steady compute; the replay
        keeps how unequal the stages and how uneven the passes of each step really were, so
        bubble - replayed is what communication and the executor cost, and replayed - formula
        what the partition's imbalance and the machine's jitter cost.

        Each stage's bytes per step (comm_bytes_per_stage; tp_bytes_per_stage under tensor
        parallelism, included in the former), the mean of its ranks: the run's comm_bytes is
        rank 0's, the first stage's, and the stages hold different layers."""
        idle = 1.0 - self.busy_s / self.step_s if self.step_s else 0.0
        steps_taken = max(self.steps_since_taken, 1)
        mine = torch.tensor([idle, mem_gib, *(b / steps_taken for b in self.comm_taken), len(self.action_s),
                             *(t for step in self.action_s for t in step)], dtype=torch.float64)
        self.busy_s = self.step_s = 0.0
        self.action_s.clear()
        # every rank ran as many steps, each with as many actions: 2 V M (3 M with W)
        every = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(every, mine)
        layout = self.env.layout
        per_stage = [sum(every[r][0].item() for r in layout.stage_ranks(s)) / len(layout.stage_ranks(s))
                     for s in range(layout.pp)]
        steps = int(every[0][4].item())
        # every pipeline: one per (dp rank, tp rank); a tp group's ranks run in step but time apart
        replayed = [replay(self.schedule, self.chunks, [every[r][5:].view(steps, -1).tolist()
                                                       for r in layout.pipeline_ranks(d, t)])
                    for d in range(layout.dp) for t in range(layout.tp)] if steps else [None]

        def per_stage_mean(i: int) -> list[int]:
            return [round(sum(every[r][i].item() for r in layout.stage_ranks(s)) / len(layout.stage_ranks(s)))
                    for s in range(layout.pp)]

        tp_bytes = {"tp_bytes_per_stage": per_stage_mean(3)} if layout.tp > 1 else {}
        return {"bubble": round(sum(per_stage) / len(per_stage), 4),
                "bubble_per_stage": [round(b, 4) for b in per_stage],
                "bubble_formula": round(self.bubble_formula, 4),
                "bubble_replayed": round(sum(replayed) / len(replayed), 4) if None not in replayed else None,
                # stages hold different layers: each one's memory (the most of its replicas)
                "mem_gib_per_stage": [round(max(every[r][1].item() for r in layout.stage_ranks(s)), 3)
                                      for s in range(layout.pp)],
                "comm_bytes_per_stage": per_stage_mean(2), **tp_bytes,
                **self.inner.log_metrics(mem_gib)}  # the MoE layers' numbers, over every stage

    def finish(self) -> None:
        self.tied.settle()

    def checkpoint_state(self) -> dict:
        return self.inner.checkpoint_state()

    def after_load(self) -> None:
        self.inner.after_load()
        self.tied.publish_weights(self.inner)

    def extra_state(self) -> dict:
        return self.inner.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.inner.load_extra_state(state)

    def state_bytes(self) -> dict[str, int]:
        return self.inner.state_bytes()

    def comm_bytes(self) -> dict[str, int]:
        taken = self.inner.comm_bytes()
        tp = sum(count for kind, count in taken.items() if kind.startswith("tp_"))
        self.comm_taken, self.steps_since_taken, self.steps = (sum(taken.values()), tp), self.steps, 0
        return taken
