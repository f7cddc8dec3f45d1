"""Does a plan fit? The estimate of its largest rank against a rank's budget, and the
message that says so: the largest terms, and the changes that would make it fit. On a GPU,
offload's host memory is judged apart, against the host's share per rank."""

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
    host_budget: Budget | None = None  # a GPU rank's share of host memory, where offload uses it

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget.per_rank and self.host_fits

    @property
    def host_fits(self) -> bool:
        return self.host_budget is None or self.estimate.host_total <= self.host_budget.per_rank

    def largest_terms(self) -> str:
        return ", ".join(f"{t.name} {gib(t.bytes)}" for t in self.estimate.largest(3))

    def advice(self) -> str:
        if not self.suggestions:
            return "no change of ZeRO stage, checkpointing or micro-batch fits: use more ranks or a smaller model"
        if not self.suggestions[0].fits:
            return f"closest: {self.suggestions[0].describe()} (still too much: add ranks or memory)"
        return "changes that fit, cheapest first: " + "; ".join(s.describe() for s in self.suggestions)

    def message(self) -> str:
        if self.estimate.total <= self.budget.per_rank:  # the device fits: the host does not
            return (f"offload needs about {gib(self.estimate.host_total)} of host memory per rank "
                    f"({self.estimate.where}), and a rank here may have {self.host_budget.describe()}; "
                    "offload to nvme instead of cpu, or use more ranks")
        return (f"the plan needs about {gib(self.estimate.total)} per rank ({self.estimate.where}), and a rank here "
                f"may have {self.budget.describe()}. Largest terms: {self.largest_terms()}. {self.advice()}")

    def as_dict(self) -> dict:
        host = {"host_budget_bytes": round(self.host_budget.per_rank), "host_budget_source": self.host_budget.source} \
            if self.host_budget else {}
        return {"fits": self.fits, "estimate": self.estimate.as_dict(), "budget_bytes": round(self.budget.per_rank),
                "budget_source": self.budget.source, "suggestions": [s.as_dict() for s in self.suggestions], **host}


def judge(recipe, world_size: int, device: str, budget: Budget, host_budget: Budget | None = None) -> Verdict:
    estimate = largest(estimate_recipe(recipe, world_size, device))
    separate_host = estimate.host_total and not estimate.host_is_device  # on a CPU rank `total` holds it
    verdict = Verdict(estimate, budget, host_budget=host_budget if separate_host else None)
    if estimate.total > budget.per_rank:
        verdict.suggestions = suggest(recipe, world_size, device, budget.per_rank)
    return verdict
