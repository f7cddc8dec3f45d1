"""The parallel layout of a job: its axes, their sizes, and where every rank sits on them.

The one description of the axes that the launcher's placement, the batch arithmetic,
`estimate`, `bench` and the worker's DeviceMesh all take; none of them divides the world
size itself. Torch-free, so the launcher and `--dry-run` use it without importing torch.

Axes: pp (pipeline stages), dp (data-parallel replicas of a stage), tp (tensor-parallel
ranks that split one layer), and ep (expert-parallel ranks), which is carved out of dp as
DeepSpeed and torchtitan do: dp = edp x ep, so the data each rank reads is the same with or
without experts. dp = world / (pp x tp).

Rank order, innermost first: tp (consecutive ranks, so one layer's ranks share a node and
its fast links: tp communicates in every layer), then dp with ep inside it
(dp_rank = edp_rank x ep + ep_rank), pipeline outermost (only activations cross between
stages). So rank = ((stage x dp) + dp_rank) x tp + tp_rank, which at tp = 1 is the
rank = stage x dp + dp_rank of the layouts before tensor parallelism; the ranks of one stage
are contiguous, and its gradient reductions stay on as few nodes as possible.

Room for context parallelism: cp would be one more axis between dp and tp (torchtitan's
order: pp, dp, cp, tp), dp = world / (pp x cp x tp), rank = (((stage x dp) + dp_rank) x cp +
cp_rank) x tp + tp_rank; a cp field with its own lists, and "cp" added to `mesh_dims`.
ZeRO would shard over dp x cp (the ranks that hold the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.divisors import divisors
from sdtrain.errors import RecipeError
from sdtrain.model.size import ties_embeddings


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int = 1
    tp: int = 1
    ep: int = 1
    tied_head: bool = True  # the output head is the token embedding (model.tie_embeddings)

    def __post_init__(self):
        for name, size in (("world size", self.world), ("parallel.pipeline.stages", self.pp),
                           ("parallel.tensor_parallel", self.tp), ("parallel.expert_parallel", self.ep)):
            if size < 1:
                raise RecipeError(f"{name} {size}: must be at least 1")
        if self.world % self.pp:
            fits = divisors(self.world)
            raise RecipeError(
                f"parallel.pipeline.stages {self.pp} does not divide the world size {self.world}: every stage "
                f"needs the same number of data-parallel replicas; use stages in {fits}, or {self._next_world()} workers"
            )
        if self.world % (self.pp * self.tp):
            fits = divisors(self.world // self.pp)
            raise RecipeError(
                f"parallel.tensor_parallel {self.tp} x parallel.pipeline.stages {self.pp} = {self.pp * self.tp} does not "
                f"divide the world size {self.world}: every stage needs whole tensor-parallel groups; use "
                f"tensor_parallel in {fits}, or {self._next_world()} workers"
            )
        if self.dp % self.ep:
            raise RecipeError(
                f"parallel.expert_parallel {self.ep} does not divide the data-parallel size {self.dp} "
                f"({self.dp_formula()}): expert groups are carved out of data-parallel ranks; use expert_parallel "
                f"in {divisors(self.dp)}{self._tp_leaving_room_for_experts()}"
            )

    @classmethod
    def of(cls, recipe, world: int) -> "Layout":
        """The layout a recipe asks for on `world` ranks (RecipeError if it cannot be laid out)."""
        parallel = recipe.parallel
        model = getattr(recipe, "model", None)  # absent: the axes alone are asked for (a head tied as gpt2's)
        return cls(world, parallel.pipeline.stages, parallel.tensor_parallel, parallel.expert_parallel,
                   model is None or ties_embeddings(model))

    @classmethod
    def if_fits(cls, world: int | None, pp: int = 1, tp: int = 1, ep: int = 1) -> "Layout | None":
        """The layout of these axes on `world` ranks, or None where the world is unknown or
        does not split into them (where the caller's own check names the problem)."""
        if not world or min(pp, tp, ep) < 1 or world % (pp * tp) or world // (pp * tp) % ep:
            return None
        return cls(world, pp, tp, ep)

    def _tp_leaving_room_for_experts(self) -> str:
        """Under tensor parallelism tp x ep may be what does not fit: the tp values whose dp
        expert_parallel divides (none are suggested without tp, where the user did not ask for it)."""
        if self.tp == 1:
            return ""
        per_stage = self.world // self.pp
        fits = [t for t in divisors(per_stage) if per_stage // t % self.ep == 0]
        return f", or tensor_parallel in {fits}" if fits else ""

    def _next_world(self) -> int:
        unit = self.pp * self.tp
        return (self.world // unit + 1) * unit

    def dp_formula(self) -> str:
        """How dp comes about, for messages: 'world 8 / pipeline stages 2'."""
        if self.tp == 1:
            return f"world {self.world} / pipeline stages {self.pp}"
        return f"world {self.world} / (pipeline stages {self.pp} x tensor_parallel {self.tp})"

    # --- sizes -----------------------------------------------------------------------------

    @property
    def dp(self) -> int:
        return self.world // (self.pp * self.tp)

    @property
    def edp(self) -> int:
        """The replicas of one set of experts: dp / ep."""
        return self.dp // self.ep

    def as_dict(self) -> dict:
        return {"pp": self.pp, "dp": self.dp, "tp": self.tp, "ep": self.ep}

    def explain(self) -> str:
        """The axes as arithmetic, for --dry-run (beside the batch's)."""
        experts = f" (expert_parallel {self.ep} inside data_parallel)" if self.ep > 1 else ""
        return (f"world {self.world} = pipeline stages {self.pp} x data_parallel {self.dp} x "
                f"tensor_parallel {self.tp}{experts}")

    def mesh_dims(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(sizes, names) of the world DeviceMesh, outermost first, in rank order; with experts
        dp is split into ("edp", "ep") there (the mesh flattens them back into "dp")."""
        if self.ep > 1:
            return (self.pp, self.edp, self.ep, self.tp), ("pp", "edp", "ep", "tp")
        return (self.pp, self.dp, self.tp), ("pp", "dp", "tp")

    # --- one rank's coordinates ------------------------------------------------------------

    def rank_of(self, stage: int, dp_rank: int, tp_rank: int = 0) -> int:
        return (stage * self.dp + dp_rank) * self.tp + tp_rank

    def stage_of(self, rank: int) -> int:
        return rank // (self.dp * self.tp)

    def dp_rank_of(self, rank: int) -> int:
        return rank // self.tp % self.dp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def ep_rank_of(self, rank: int) -> int:
        return self.dp_rank_of(rank) % self.ep

    def edp_rank_of(self, rank: int) -> int:
        """Which replica of its experts this rank holds (the placement's "expert group")."""
        return self.dp_rank_of(rank) // self.ep

    def coordinates(self, rank: int) -> dict:
        """For the placement table and --dry-run --json."""
        return {"pipeline_stage": self.stage_of(rank), "dp_rank": self.dp_rank_of(rank),
                "tp_rank": self.tp_rank_of(rank), "expert_group": self.edp_rank_of(rank)}

    # --- the ranks of each group -----------------------------------------------------------

    def stage_ranks(self, stage: int) -> list[int]:
        """Every rank of a pipeline stage (dp x tp of them, contiguous)."""
        size = self.dp * self.tp
        return list(range(stage * size, (stage + 1) * size))

    def dp_ranks(self, stage: int, tp_rank: int = 0) -> list[int]:
        """The data-parallel group of a stage for one tensor-parallel rank: the ranks that hold
        the same weights (gradients are averaged, ZeRO shards, over them)."""
        return [self.rank_of(stage, d, tp_rank) for d in range(self.dp)]

    def tp_ranks(self, stage: int, dp_rank: int) -> list[int]:
        """The ranks that split one replica's layers among them."""
        return [self.rank_of(stage, dp_rank, t) for t in range(self.tp)]

    def pipeline_ranks(self, dp_rank: int, tp_rank: int = 0) -> list[int]:
        """One pipeline: the rank of each stage that holds this (data, tensor)-parallel slot."""
        return [self.rank_of(stage, dp_rank, tp_rank) for stage in range(self.pp)]

    def ep_ranks(self, stage: int, edp_rank: int, tp_rank: int = 0) -> list[int]:
        """The ranks that split one set of experts among them (the all-to-all's group)."""
        return [self.rank_of(stage, edp_rank * self.ep + e, tp_rank) for e in range(self.ep)]

    def edp_ranks(self, stage: int, ep_rank: int, tp_rank: int = 0) -> list[int]:
        """The ranks that hold the same experts (their gradients are averaged there), in edp order."""
        return [self.rank_of(stage, j * self.ep + ep_rank, tp_rank) for j in range(self.edp)]

    def tied_pairs(self) -> list[list[int]]:
        """(first stage, last stage) of every pipeline, which share the tied embedding and head;
        in one order every rank creates their groups in. None without a pipeline, or with an
        untied head."""
        if self.pp == 1 or not self.tied_head:
            return []
        return [[ranks[0], ranks[-1]] for ranks in
                (self.pipeline_ranks(d, t) for d in range(self.dp) for t in range(self.tp))]
