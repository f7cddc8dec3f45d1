"""Pipeline strategies of `sdtrain bench`: `pp<P>-<schedule>[-tp<T>][-zero<S>]` (pp2-1f1b,
pp4-gpipe, pp2-interleaved-zero1, pp2-1f1b-tp2), each a real `sdtrain launch` with P stages over
the workers (each stage's layers split over T tensor-parallel ranks where -tp<T> is given) and
the rest data parallel, and the micro-batches it runs.

Micro-batches: a pipeline's bubble is (P - 1) / (M + P - 1), so a bench at M = 1 would only
measure idle stages. Every pipeline entry runs at the same global batch as the other rows
of its world size (so tokens/s compare like with like) and splits it into M micro-batches
per replica, the smallest multiple of P that is at least 2P and divides the replica's
share: the same M for every schedule of one P (interleaved needs a multiple of P), and for
the DeepSpeed pipeline peer. Interleaved runs V = 2 chunks per rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from sdtrain.errors import UserInputError
from sdtrain.parallel.layout import Layout
from sdtrain.recipe import PipelineConfig

SCHEDULES = get_args(PipelineConfig.model_fields["schedule"].annotation)  # the recipe's own list
VIRTUAL_STAGES = {"interleaved": 2}
NAME = re.compile(rf"pp(\d+)-({'|'.join(SCHEDULES)})(?:-tp(\d+))?(?:-zero([0-3]))?")
SYNTAX = (f"pp<P>-<schedule>[-tp<T>][-zero<S>], schedule one of {', '.join(SCHEDULES)} "
          "(e.g. pp2-1f1b, pp4-interleaved-zero1, pp2-1f1b-tp2)")


@dataclass(frozen=True)
class PipelineStrategy:
    name: str
    stages: int
    schedule: str
    zero_stage: int
    tp: int = 1  # tensor-parallel ranks of each stage

    @property
    def virtual_stages(self) -> int:
        return VIRTUAL_STAGES.get(self.schedule, 1)

    def micro_batches(self, global_batch: int, world: int) -> int:
        """M for this pipeline at `world` workers and the row's global batch (module docstring)."""
        P, dp = self.stages, Layout(world, self.stages, self.tp).dp
        per_replica = global_batch // dp if global_batch % dp == 0 else 0
        for M in range(2 * P, per_replica + 1, P):
            if per_replica % M == 0:
                return M
        raise UserInputError(
            f"--strategies {self.name} at {world} workers: {P} stages x {dp} data-parallel replicas need at least "
            f"2P = {2 * P} micro-batches per replica (a multiple of {P}) dividing the global batch {global_batch} "
            f"/ {dp}; --set train.global_batch_size={2 * P * dp} (or a multiple of it)")

    def overrides(self, global_batch: int, world: int) -> list[str]:
        """The `--set`s that make the bench recipe this pipeline at `world` workers."""
        M = self.micro_batches(global_batch, world)
        return [f"parallel.pipeline.stages={self.stages}", f"parallel.pipeline.schedule={self.schedule}",
                f"parallel.pipeline.virtual_stages={self.virtual_stages}", f"parallel.zero_stage={self.zero_stage}",
                f"parallel.tensor_parallel={self.tp}",
                f"train.global_batch_size={global_batch}", f"train.grad_accum_steps={M}",
                f"train.micro_batch_size={global_batch // Layout(world, self.stages, self.tp).dp // M}"]


def parse_pipeline_strategy(name: str) -> PipelineStrategy | None:
    """The pipeline a strategy name asks for, or None when it names no pipeline."""
    match = NAME.fullmatch(name)
    if match is None:
        if name.startswith("pp"):
            raise UserInputError(f"--strategies: {name!r} is no pipeline strategy; write {SYNTAX}")
        return None
    stages = int(match[1])
    if stages < 2:
        raise UserInputError(f"--strategies {name}: a pipeline has at least 2 stages")
    tp = int(match[3] or 1)
    if tp < 1:
        raise UserInputError(f"--strategies {name}: the tensor-parallel size is at least 1")
    return PipelineStrategy(name, stages, match[2], int(match[4] or 0), tp)
