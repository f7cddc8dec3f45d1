"""The cheapest changes that make a plan fit, each with its new estimate.

Tried one at a time, cheapest first: sequence parallelism under TP (the same traffic,
activations split further), a higher ZeRO stage (more communication, stage 3 the
most), activation checkpointing (about a third more compute), a smaller micro-batch with
more accumulation (the same global batch, smaller matmuls), and last offload (ZeRO-Offload /
-Infinity: the optimizer state, and at stage 3 the weight shards, to host memory beside a GPU
or to files; every step then waits on some copying or I/O). When no single change is
enough, pairs and then all of them together.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from sdtrain.estimate.plan import estimate_recipe, largest


@dataclass(frozen=True)
class Suggestion:
    settings: tuple[str, ...]  # --set KEY=VALUE strings
    total: float  # the new estimate of the largest rank, bytes
    fits: bool
    disk: float = 0.0  # nvme offload's files per rank, bytes

    def describe(self) -> str:
        sets = " ".join(f"--set {s}" for s in self.settings)
        disk = f" (+ {self.disk / 2**30:.2f} GiB per rank on disk under parallel.zero.nvme_path)" if self.disk else ""
        return f"{sets}: {self.total / 2**30:.2f} GiB per rank{disk}"

    def as_dict(self) -> dict:
        return {"set": list(self.settings), "total_bytes": round(self.total), "fits": self.fits,
                "disk_bytes": round(self.disk)}


def candidate_changes(recipe, device: str = "cpu") -> list[dict[str, object]]:
    """Single changes, cheapest first: {dotted key: value}."""
    train, parallel = recipe.train, recipe.parallel
    changes: list[dict[str, object]] = []
    tp = parallel.tensor_parallel
    if tp > 1 and not parallel.sequence_parallel and recipe.model.seq_len % tp == 0:
        changes.append({"parallel.sequence_parallel": True})  # the same traffic as all-gathers and reduce-scatters
    changes += [{"parallel.zero_stage": s} for s in range(parallel.zero_stage + 1, 4)]
    if not train.activation_checkpointing and parallel.pipeline.schedule != "zero_bubble":
        changes.append({"train.activation_checkpointing": True})
    micro, accum = train.micro_batch_size or 1, train.grad_accum_steps or 1
    smaller = micro // 2
    while smaller >= 1:
        if micro % smaller == 0:
            changes.append({"train.micro_batch_size": smaller, "train.grad_accum_steps": accum * micro // smaller})
        smaller //= 2
    return changes + offload_changes(parallel, device)


def offload_changes(parallel, device: str) -> list[dict[str, object]]:
    """The optimizer state off the device, and the weight shards too (at stage 3: below it, and
    at stage 0 for either, only combined with a higher stage). Host memory only beside a GPU:
    on a CPU machine the host is the device's memory, and only the disk moves anything."""
    zero, changes = parallel.zero, []
    for where in (("cpu", "nvme") if device == "cuda" else ("nvme",)):
        optimizer = {} if zero.offload_optimizer == where else {"parallel.zero.offload_optimizer": where}
        if optimizer and zero.offload_optimizer != "nvme":
            changes.append(optimizer)
        if zero.offload_params != where:  # needs stage 3: below it, only with a higher stage (suggest's _valid)
            changes.append({**optimizer, "parallel.zero.offload_params": where})
    return changes


def apply(recipe, change: dict[str, object]):
    changed = recipe.model_copy(deep=True)
    for key, value in change.items():
        *sections, name = key.split(".")
        node = changed
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, value)
    return changed


def suggest(recipe, world_size: int, device: str, budget: float, count: int = 3) -> list[Suggestion]:
    """Up to `count` changes that fit in `budget` bytes per rank, cheapest first; if none
    does, the one that comes closest (fits False)."""
    singles = candidate_changes(recipe, device)  # an invalid one alone (offload at stage 0) is never chosen
    tried = []

    def attempt(changes: list[dict]) -> Suggestion:
        merged = {k: v for change in changes for k, v in change.items()}
        if not _valid(recipe, merged):
            return Suggestion((), float("inf"), False)
        estimates = estimate_recipe(apply(recipe, merged), world_size, device)
        total = largest(estimates).total
        settings = tuple(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items())
        suggestion = Suggestion(settings, total, total <= budget, max(e.disk_total for e in estimates))
        tried.append(suggestion)
        return suggestion

    fitting = [s for s in (attempt([c]) for c in singles) if s.fits]
    if not fitting:
        kinds = _one_per_kind(singles)
        for size in range(2, len(kinds) + 1):
            fitting = [s for s in (attempt(list(c)) for c in combinations(kinds, size)) if s.fits]
            if fitting:
                break
    if fitting:
        return fitting[:count]
    return [min(tried, key=lambda s: s.total)] if tried else []


def _valid(recipe, change: dict) -> bool:
    """Offload goes with ZeRO (offload_params with stage 3), as the recipe checks."""
    stage = change.get("parallel.zero_stage", recipe.parallel.zero_stage)
    params = change.get("parallel.zero.offload_params", recipe.parallel.zero.offload_params)
    optimizer = change.get("parallel.zero.offload_optimizer", recipe.parallel.zero.offload_optimizer)
    return (stage >= 1 or (optimizer == "none" and params == "none")) and (stage == 3 or params == "none")


def _one_per_kind(singles: list[dict]) -> list[dict]:
    """For combinations: the strongest of each kind (stage 3, checkpointing, micro-batch 1)."""
    kinds: dict[str, dict] = {}
    for change in singles:
        kinds[next(iter(change))] = change  # later ones of a kind are stronger
    return list(kinds.values())
