"""The cheapest changes that make a plan fit, each with its new estimate.

Tried one at a time, cheapest first: sequence parallelism under TP (the same traffic,
activations split further), a higher ZeRO stage (more communication, stage 3 the
most), activation checkpointing (about a third more compute), a smaller micro-batch with
more accumulation (the same global batch, smaller matmuls). When no single change is
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

    def describe(self) -> str:
        sets = " ".join(f"--set {s}" for s in self.settings)
        return f"{sets}: {self.total / 2**30:.2f} GiB per rank"

    def as_dict(self) -> dict:
        return {"set": list(self.settings), "total_bytes": round(self.total), "fits": self.fits}


def candidate_changes(recipe) -> list[dict[str, object]]:
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
    return changes


def apply(recipe, change: dict[str, object]):
    changed = recipe.model_copy(deep=True)
    for key, value in change.items():
        section, name = key.split(".")
        setattr(getattr(changed, section), name, value)
    return changed


def suggest(recipe, world_size: int, device: str, budget: float, count: int = 3) -> list[Suggestion]:
    """Up to `count` changes that fit in `budget` bytes per rank, cheapest first; if none
    does, the one that comes closest (fits False)."""
    singles = candidate_changes(recipe)
    tried = []

    def attempt(changes: list[dict]) -> Suggestion:
        merged = {k: v for change in changes for k, v in change.items()}
        total = largest(estimate_recipe(apply(recipe, merged), world_size, device)).total
        settings = tuple(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items())
        suggestion = Suggestion(settings, total, total <= budget)
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


def _one_per_kind(singles: list[dict]) -> list[dict]:
    """For combinations: the strongest of each kind (stage 3, checkpointing, micro-batch 1)."""
    kinds: dict[str, dict] = {}
    for change in singles:
        kinds[next(iter(change))] = change  # later ones of a kind are stronger
    return list(kinds.values())
