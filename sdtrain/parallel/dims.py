"""The parallel dimensions of a job: pipeline stages x data-parallel replicas (expert
parallelism, when it lands, divides the data-parallel size). Torch-free: the launcher's
placement and batch arithmetic and the worker's DeviceMesh all ask this one description.

Ranks are laid out with the pipeline outermost (as Megatron and torchtitan do):
rank = stage * dp + dp_rank. The ranks of one stage are contiguous, so a stage's
data-parallel group sits on as few nodes as possible, and its gradient reductions, the
heaviest traffic, stay inside them; only activations cross between stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.divisors import divisors
from sdtrain.errors import RecipeError


@dataclass(frozen=True)
class ParallelDims:
    world: int
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        if self.world % self.pp:
            fits = divisors(self.world)
            raise RecipeError(
                f"parallel.pipeline.stages {self.pp} does not divide the world size {self.world}: every stage "
                f"needs the same number of data-parallel replicas; use stages in {fits}, or {self._next_world()} workers"
            )
        if self.dp % self.ep:
            raise RecipeError(
                f"parallel.expert_parallel {self.ep} does not divide the data-parallel size {self.dp} "
                f"(world {self.world} / pipeline stages {self.pp}): expert groups are carved out of "
                "data-parallel ranks"
            )

    def _next_world(self) -> int:
        return (self.world // self.pp + 1) * self.pp

    @property
    def dp(self) -> int:
        return self.world // self.pp

    def stage_of(self, rank: int) -> int:
        return rank // self.dp

    def dp_rank_of(self, rank: int) -> int:
        return rank % self.dp

    def stage_ranks(self, stage: int) -> list[int]:
        """The data-parallel group of a stage."""
        return list(range(stage * self.dp, (stage + 1) * self.dp))

    def pipeline_ranks(self, dp_rank: int) -> list[int]:
        """One pipeline: the rank of each stage that holds this data-parallel replica."""
        return [stage * self.dp + dp_rank for stage in range(self.pp)]

    def coordinates(self, rank: int) -> dict:
        return {"pipeline_stage": self.stage_of(rank), "dp_rank": self.dp_rank_of(rank),
                "expert_group": self.dp_rank_of(rank) // self.ep}

    def as_dict(self) -> dict:
        return {"pp": self.pp, "dp": self.dp, "ep": self.ep}
