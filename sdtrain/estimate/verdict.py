"""Does a plan fit? The estimate of its largest rank against a rank's budget, and the
message that says so: the largest terms, and the changes that would make it fit."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdtrain.estimate.fit import Budget
from sdtrain.estimate.plan import estimate_recipe, largest
from sdtrain.estimate.suggest import Suggestion, suggest
from sdtrain.estimate.terms import Estimate, gib


@dataclass
class Verdict:
    estimate: Estimate
    budget: Budget
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget.per_rank

    def largest_terms(self) -> str:
        return ", ".join(f"{t.name} {gib(t.bytes)}" for t in self.estimate.largest(3))

    def advice(self) -> str:
        if not self.suggestions:
            return "no change of ZeRO stage, checkpointing or micro-batch fits: use more ranks or a smaller model"
        if not self.suggestions[0].fits:
            return f"closest: {self.suggestions[0].describe()} (still too much: add ranks or memory)"
        return "changes that fit, cheapest first: " + "; ".join(s.describe() for s in self.suggestions)

    def message(self) -> str:
        return (f"the plan needs about {gib(self.estimate.total)} per rank ({self.estimate.where}), and a rank here "
                f"may have {self.budget.describe()}. Largest terms: {self.largest_terms()}. {self.advice()}")

    def as_dict(self) -> dict:
        return {"fits": self.fits, "estimate": self.estimate.as_dict(), "budget_bytes": round(self.budget.per_rank),
                "budget_source": self.budget.source, "suggestions": [s.as_dict() for s in self.suggestions]}


def judge(recipe, world_size: int, device: str, budget: Budget) -> Verdict:
    estimate = largest(estimate_recipe(recipe, world_size, device))
    verdict = Verdict(estimate, budget)
    if not verdict.fits:
        verdict.suggestions = suggest(recipe, world_size, device, budget.per_rank)
    return verdict
