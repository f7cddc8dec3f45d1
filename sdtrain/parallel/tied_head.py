"""The tied embedding and output head across pipeline stages.

On one stage the head *is* the token embedding. Split over P > 1 stages, the first stage
holds the embedding (a parameter, with its optimizer state) and the last stage a copy as
its head: a buffer that requires grad, so it is no parameter of the last stage (no second
optimizer state, no second checkpoint entry, not counted twice in the gradient norm).

Each step the two are kept identical, as on one stage:
- the head's gradient, averaged over the last stage's replicas, goes to the first stage of
  the same replica, which adds it to the embedding's gradient before the update (the
  gradient of a tied weight is the sum of both uses);
- the updated embedding goes back to the last stage. That broadcast is asynchronous (it
  took about 3% of a step when it was not): the head waits for it just before its next use
  (`settle`), so the transfer overlaps the next step's first forwards.

Under tensor parallelism the embedding and the head are vocabulary-parallel (vocab_parallel.py):
tp rank r of the first stage holds vocabulary rows [r V / T, (r + 1) V / T) of the embedding,
tp rank r of the last stage the same rows of the head. Each pipeline is one (dp rank, tp
rank) slot (Layout.tied_pairs), so the pairs above tie the same rows. Those gradients are
complete on their rank (the head sees the whole hidden states, the embedding every id),
never partial sums over tp: adding one to the embedding's gradient counts it once.

An untied head (llama's default, `tie_embeddings: false`) is a parameter of the last stage
like any other: nothing here to do, and Layout.tied_pairs makes no groups for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.tp_collectives import TensorParallel


class TiedHead:
    def __init__(self, model: nn.Module, env: DistEnv, has_head: bool, has_embedding: bool,
                 tp: TensorParallel | None = None):
        self.model, self.env = model, env
        self.is_head = has_head and not has_embedding  # holds the copy
        self.is_embedding = has_embedding and not has_head  # holds the original
        if env.tied_group is None or not model.cfg.tie_embeddings:
            self.is_head = self.is_embedding = False
        self.first, self.last = env.pipeline_rank(0), env.pipeline_rank(env.pp_size - 1)
        self.in_flight = None  # (work, tensor it sends or fills) of the last publish
        if self.is_head:
            head = model.lm_head
            weight = torch.empty(head.weight.shape, dtype=torch.float32, device=env.device)
            rows = weight.size(0)
            whole = weight if tp is None else torch.empty(rows * tp.size, weight.size(1), device=env.device)
            with torch.no_grad():
                model.initial_value("lm_head.weight", whole)  # as the embedding starts
                if tp is not None:  # this tp rank's vocabulary rows, as its embedding's
                    weight.copy_(whole[tp.rank * rows:(tp.rank + 1) * rows])
            del head._parameters["weight"]
            head.register_buffer("weight", weight.requires_grad_(), persistent=False)

    def start(self, replicas) -> None:
        """Once the replicas' strategy is built: the copy in its compute dtype (as the
        embedding is), and equal to the embedding."""
        if self.is_head:
            dtype = next((p.dtype for p in replicas.plain.parameters()), torch.float32)
            self.model.lm_head.weight = self.model.lm_head.weight.detach().to(dtype).requires_grad_()
        self.publish_weights(replicas)

    def reduce_grads(self, replicas) -> None:
        """After the step's backward passes, before the update."""
        self.settle()  # the embedding must not change while it is still being sent
        if self.is_head:
            grad = self.model.lm_head.weight.grad
            if self.env.dp_size > 1:
                dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.env.dp_group)
            dist.broadcast(grad, src=self.last, group=self.env.tied_group)
            self.model.lm_head.weight.grad = None
        elif self.is_embedding:
            embedding = self.model.tok_emb.weight
            grad = torch.empty(embedding.shape, dtype=embedding.dtype, device=self.env.device)
            dist.broadcast(grad, src=self.last, group=self.env.tied_group)
            replicas.add_grad(embedding, grad)

    def publish_weights(self, replicas) -> None:
        """After an update (or a checkpoint load): the head starts taking the embedding's
        value. One broadcast at a time: two in flight could land out of order."""
        self.settle()
        if self.is_embedding:
            value = replicas.full_weight(self.model.tok_emb.weight)  # kept alive until sent
        elif self.is_head:
            value = self.model.lm_head.weight.data
        else:
            return
        self.in_flight = (dist.broadcast(value, src=self.first, group=self.env.tied_group, async_op=True), value)

    def settle(self) -> None:
        """Before the head's next use, and before the embedding changes: the last publish done."""
        if self.in_flight is not None:
            self.in_flight[0].wait()
            self.in_flight = None
