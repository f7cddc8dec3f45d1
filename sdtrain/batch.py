"""Batch-size arithmetic: global = micro x grad_accum x data_parallel.

Any two of the three recipe values determine the third once the data-parallel size is
known (at launch): the Layout's dp, world / (pipeline stages x tensor_parallel); expert
parallelism does not change it. Inconsistent values are refused with the arithmetic spelled out and
settings that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.errors import RecipeError


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    grad_accum: int
    data_parallel: int

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.grad_accum

    def explain(self) -> str:
        return (
            f"global_batch_size {self.global_batch} = micro_batch_size {self.micro_batch}"
            f" x grad_accum_steps {self.grad_accum} x data_parallel {self.data_parallel}"
        )

    def as_dict(self) -> dict:
        return {
            "global": self.global_batch,
            "micro": self.micro_batch,
            "grad_accum": self.grad_accum,
            "data_parallel": self.data_parallel,
        }


def derive_batch(
    global_batch: int | None, micro_batch: int | None, grad_accum: int | None, data_parallel: int
) -> BatchPlan:
    g, m, a, dp = global_batch, micro_batch, grad_accum, data_parallel
    if g is None and m is None:
        raise RecipeError(
            "train: set global_batch_size or micro_batch_size (any two of global_batch_size, "
            "micro_batch_size, grad_accum_steps determine the third)"
        )
    if g is None:
        return BatchPlan(m * (a or 1) * dp, m, a or 1, dp)
    if m is None:
        a = a or 1
        if g % (a * dp):
            raise RecipeError(
                f"global_batch_size {g} is not divisible by grad_accum_steps {a} x "
                f"data_parallel {dp} = {a * dp}; {_propose_global(g, a * dp, 'grad_accum_steps', a)}"
                f"{_propose_accum(g, dp)}"
            )
        return BatchPlan(g, g // (a * dp), a, dp)
    if a is None:
        if g % (m * dp):
            raise RecipeError(
                f"global_batch_size {g} is not divisible by micro_batch_size {m} x "
                f"data_parallel {dp} = {m * dp}; {_propose_global(g, m * dp, 'micro_batch_size', m)}"
                f"{_propose_micro(g, dp)}"
            )
        return BatchPlan(g, m, g // (m * dp), dp)
    if m * a * dp != g:
        raise RecipeError(
            f"global_batch_size {g} != micro_batch_size {m} x grad_accum_steps {a} x "
            f"data_parallel {dp} = {m * a * dp}; set global_batch_size {m * a * dp}, or drop "
            f"grad_accum_steps and let it be derived{_propose_micro(g, dp)}"
        )
    return BatchPlan(g, m, a, dp)


def _propose_global(g: int, unit: int, name: str, value: int) -> str:
    lower, upper = (g // unit) * unit, (g // unit + 1) * unit
    options = [str(x) for x in (lower, upper) if x > 0]
    return f"with {name} {value} use global_batch_size {' or '.join(options)}"


def _propose_micro(g: int, dp: int) -> str:
    if g % dp:
        return f" (global_batch_size must be a multiple of data_parallel {dp})"
    micros = sorted(g // dp // d for d in _smallest_divisors(g // dp))  # the largest divisors
    return f"; or keep global_batch_size {g} with micro_batch_size in {micros}"


def _propose_accum(g: int, dp: int) -> str:
    if g % dp:
        return f" (global_batch_size must be a multiple of data_parallel {dp})"
    return f"; or keep global_batch_size {g} with grad_accum_steps in {_smallest_divisors(g // dp)}"


def _smallest_divisors(n: int, count: int = 6, scan: int = 100_000) -> list[int]:
    """Up to `count` smallest divisors of n, looking no further than `scan`: a batch size can be
    any integer a user typed, and a suggestion must not take longer than the typo."""
    found = []
    for d in range(1, min(n, scan) + 1):
        if n % d == 0:
            found.append(d)
            if len(found) == count:
                break
    return found
