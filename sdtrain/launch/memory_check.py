"""The fit check before launch: the memory estimate per rank against what each rank of this
machine may have. A plan that will not fit is refused (exit 2) before any worker starts,
naming its largest terms and the cheapest changes that would fit; `launch.memory_check`
warn / off overrides. A remote node's agent runs the same check on its own machine
(check_node), since only it can see its memory.
"""

from __future__ import annotations

from sdtrain.errors import UserInputError
from sdtrain.estimate.fit import node_budget
from sdtrain.estimate.verdict import judge

OVERRIDE = "(launch.memory_check: warn or off launches anyway)"


def memory_problem(recipe, world_size: int, workers_here: int, device: str) -> str | None:
    """None if the plan fits on this machine (or cannot be checked), else why not."""
    if recipe.launch.memory_check == "off":
        return None
    budget = node_budget(device, workers_here)
    if budget is None:
        return None
    verdict = judge(recipe, world_size, device, budget)
    return None if verdict.fits else f"will not fit in memory: {verdict.message()}"


def check_memory(recipe, plan, launcher: str) -> list[str]:
    """The launcher's check of its own machine: warnings to print, or UserInputError."""
    if launcher != "local":
        return []  # each node agent checks its own machine before it starts workers
    device = "cuda" if plan.backend == "nccl" else "cpu"
    workers = sum(len(node.slots) for node in plan.nodes)
    problem = memory_problem(recipe, plan.world_size, workers, device)
    if problem is None:
        return []
    if recipe.launch.memory_check == "error":
        raise UserInputError(f"{problem} {OVERRIDE}")
    return [problem]


def check_node(recipe, world_size: int, nproc: int) -> str | None:
    """A node agent's check of its machine, before its workers start."""
    if recipe.launch.memory_check != "error":
        return None
    try:
        import torch

        device = "cuda" if recipe.launch.backend != "gloo" and torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    problem = memory_problem(recipe, world_size, nproc, device)
    return f"{problem} {OVERRIDE}" if problem else None
