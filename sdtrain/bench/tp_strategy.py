"""Tensor-parallel strategies of `sdtrain bench`: `tp<T>[-nosp][-zero<S>]` (tp2, tp2-nosp,
tp4-zero1), each a real `sdtrain launch` with the model's layers split over T consecutive ranks
(Megatron-style, sequence parallel unless -nosp) and the rest of the workers data parallel; and
its peer, PyTorch's DTensor tensor parallelism over every worker (peer_dtensor_tp.py).

Batch: a tp row runs the global batch and gradient accumulation of the other rows of its world
size (so tokens/s compare like with like), over dp = world / T replicas: each replica's
micro-batch is T times a data-parallel row's. Its rows carry T, whether sequence parallelism
was on, and TP's bytes per step by kind (metrics.jsonl's `tp_bytes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdtrain.errors import UserInputError
from sdtrain.parallel.layout import Layout

NAME = re.compile(r"tp(\d+)(-nosp)?(?:-zero([0-3]))?")
SYNTAX = ("tp<T>[-nosp][-zero<S>], T tensor-parallel ranks, sequence parallel unless -nosp "
          "(e.g. tp2, tp2-nosp, tp4-zero1)")


@dataclass(frozen=True)
class TensorStrategy:
    name: str
    tp: int
    zero_stage: int = 0
    sequence_parallel: bool = True

    def overrides(self, global_batch: int, grad_accum: int, world: int) -> list[str]:
        """The `--set`s that make the bench recipe this layout at `world` workers, at the global
        batch and accumulation of that world's data-parallel rows (RecipeError where T does not
        divide the workers: the recipe's own message)."""
        dp = Layout(world, tp=self.tp).dp
        if global_batch % (dp * grad_accum):
            raise UserInputError(
                f"--strategies {self.name} at {world} workers: the global batch {global_batch} does not split over "
                f"{dp} data-parallel replica(s) x {grad_accum} accumulation steps; --set "
                f"train.global_batch_size={dp * grad_accum * max(1, global_batch // (dp * grad_accum))}")
        return [f"parallel.tensor_parallel={self.tp}", f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
                f"parallel.zero_stage={self.zero_stage}", "parallel.pipeline.stages=1",
                f"train.global_batch_size={global_batch}", f"train.grad_accum_steps={grad_accum}",
                f"train.micro_batch_size={global_batch // (dp * grad_accum)}"]


def parse_tensor_strategy(name: str) -> TensorStrategy | None:
    """The tensor-parallel strategy a name asks for, or None when it names none."""
    match = NAME.fullmatch(name)
    if match is None:
        if name.startswith("tp"):
            raise UserInputError(f"--strategies: {name!r} is no tensor-parallel strategy; write {SYNTAX}")
        return None
    tp = int(match[1])
    if tp < 2:
        raise UserInputError(f"--strategies {name}: tensor parallelism splits over at least 2 ranks (tp1 is ddp)")
    return TensorStrategy(name, tp, int(match[3] or 0), sequence_parallel=match[2] is None)
