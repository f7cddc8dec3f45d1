"""Pipeline parallelism: this rank's chunks of the model, run by a schedule over a step's
micro-batches; the stage's data-parallel replicas (DDP semantics or ZeRO) inside.

The executor walks this rank's actions (schedules.py) in order. A forward receives its
input from the previous chunk's rank (or reads the micro-batch on the first chunk), runs the
chunk and sends the output on; the last chunk computes the loss. A backward receives the
gradient of its output (or starts from the loss), runs autograd through the chunk and sends
the gradient of its input back. Receives block; sends are asynchronous and matched by tag
(kind, chunk, micro-batch), so no schedule can deadlock on message order.

The tied embedding/head lives on the first and the last stage (tied_head.py). Every
reduction names its group: gradients over the stage's data-parallel replicas, the global
gradient norm over the pipeline too, the loss from the last stage to everyone.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.partition import chunk_count, chunks_of_rank, partition_layers
from sdtrain.parallel.schedules import bubble_formula, build_schedule
from sdtrain.parallel.strategy import Strategy
from sdtrain.parallel.tied_head import TiedHead


class Pipeline(Strategy):
    def __init__(self, model: nn.Module, recipe, env: DistEnv, micro_batches: int, build_replicas):
        pipeline = recipe.parallel.pipeline
        self.env, self.model = env, model
        self.chunks = chunk_count(pipeline)
        self.stages = pipeline.stages
        layers = partition_layers(pipeline, recipe.model)
        self.layers = {c: [str(i) for i in layers[c]] for c in chunks_of_rank(env.stage, pipeline)}
        self.tied = TiedHead(model, env, self.chunks - 1 in self.layers, 0 in self.layers)
        self.inner = build_replicas(model)  # DataParallel or Zero over this stage's replicas
        self.tied.start(self.inner)
        self.actions = build_schedule(pipeline.schedule, pipeline.stages, pipeline.virtual_stages, micro_batches)[env.stage]
        self.bubble_formula = bubble_formula(pipeline.schedule, pipeline.stages, pipeline.virtual_stages, micro_batches)
        self.eval_actions = [(c, m) for c in sorted(self.layers) for m in range(micro_batches)]
        self.dtype = next((p.dtype for p in self.inner.plain.parameters()), torch.float32)
        self.busy_s = self.step_s = 0.0  # compute time and wall time of the steps since the last report

    # --- one step ------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list, autocast) -> torch.Tensor:
        M, started = len(micro_batches), time.perf_counter()
        saved: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> (input, output or loss)
        sends, total = [], torch.zeros((), device=self.env.device)
        for action in self.actions:
            chunk, m = action.chunk, action.micro_batch
            if action.kind == "F":
                x = micro_batches[m][0] if chunk == 0 else self._receive("F", chunk, m, micro_batches[m][0])
                compute = time.perf_counter()
                with autocast():
                    y = self.model(x, layers=self.layers[chunk])
                    if chunk == self.chunks - 1:
                        y = self.inner.plain.loss(y, micro_batches[m][1])
                        total += y.detach().float()
                self.busy_s += time.perf_counter() - compute
                saved[chunk, m] = (x, y)
                if chunk < self.chunks - 1:
                    sends.append(self._send("F", chunk + 1, m, y.detach()))
            else:
                x, y = saved.pop((chunk, m))
                if chunk == self.chunks - 1:
                    compute = time.perf_counter()
                    self.inner.backward(y / M)
                else:
                    grad = self._receive("B", chunk, m, micro_batches[m][0], like=y)
                    compute = time.perf_counter()
                    self.inner.backward(y, grad)
                self.busy_s += time.perf_counter() - compute
                if chunk > 0:
                    sends.append(self._send("B", chunk - 1, m, x.grad))
        for work in sends:
            work.wait()
        self.step_s += time.perf_counter() - started
        return total

    @torch.no_grad()
    def evaluate(self, micro_batches: list, autocast) -> torch.Tensor:
        sends, total = [], torch.zeros((), device=self.env.device)
        for chunk, m in self.eval_actions:
            x = micro_batches[m][0] if chunk == 0 else self._receive("F", chunk, m, micro_batches[m][0])
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
        """Only the last stage has the loss: every rank gets its mean over all replicas."""
        value = loss_sum.detach().float().clone() / count
        if self.chunks - 1 not in self.layers:
            value.zero_()
        dist.all_reduce(value)
        return value.item() / self.env.dp_size

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        self.tied.reduce_grads(self.inner)
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

    def _receive(self, kind: str, chunk: int, m: int, inputs: torch.Tensor, like: torch.Tensor | None = None):
        shape = like.shape if like is not None else (*inputs.shape, self.model.cfg.d_model)
        buffer = torch.empty(shape, dtype=self.dtype if like is None else like.dtype, device=self.env.device)
        source = chunk - 1 if kind == "F" else chunk + 1
        dist.recv(buffer, self._peer(source), tag=self._tag(kind, chunk, m))
        return buffer.requires_grad_() if kind == "F" and torch.is_grad_enabled() else buffer

    # --- the rest is the replicas' -------------------------------------------------------

    def log_metrics(self) -> dict:
        """The bubble: each stage's idle share of the steps since the last record, from its
        own timeline (time spent computing against the steps' wall time; waiting for a
        neighbour is idle), averaged over the stage's replicas, beside the schedule's formula."""
        idle = 1.0 - self.busy_s / self.step_s if self.step_s else 0.0
        self.busy_s = self.step_s = 0.0
        every = [torch.zeros(1, dtype=torch.float64) for _ in range(self.env.world_size)]
        dist.all_gather(every, torch.tensor([idle], dtype=torch.float64))
        dims = self.env.dims
        per_stage = [sum(every[r].item() for r in dims.stage_ranks(s)) / dims.dp for s in range(dims.pp)]
        return {"bubble": round(sum(per_stage) / len(per_stage), 4),
                "bubble_per_stage": [round(b, 4) for b in per_stage],
                "bubble_formula": round(self.bubble_formula, 4)}

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
        return self.inner.comm_bytes()
