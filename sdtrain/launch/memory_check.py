"""The fit check before launch: the memory estimate per rank against what each rank of this
machine may have, and nvme offload's files against the free space where they go. A plan
that will not fit is refused (exit 2) before any worker starts, naming its largest terms and
the cheapest changes that would fit (or, for the disk, the folder, the bytes needed and
free); `launch.memory_check` warn / off overrides. A user's nvme_path that is not a writable
folder is refused whatever memory_check says: the workers would refuse it. A remote node's agent runs the same check
on its own machine (check_node), since only it can see its memory and its disk.

On a CPU machine device and host are the same memory: the estimate's total already holds
offload's host buffers. On a GPU the host memory offload uses is checked apart, against the
host's memory shared by the node's workers.
"""

from __future__ import annotations

from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.estimate.disk import disk_problem, nvme_path_problem, offload_folder
from sdtrain.estimate.fit import cpu_budget, node_budget
from sdtrain.estimate.plan import estimate_recipe
from sdtrain.estimate.verdict import judge

OVERRIDE = "(launch.memory_check: warn or off launches anyway)"


def memory_problem(recipe, world_size: int, workers_here: int, device: str) -> str | None:
    """None if the plan fits on this machine (or cannot be checked), else why not."""
    if recipe.launch.memory_check == "off":
        return None
    budget = node_budget(device, workers_here)
    if budget is None:
        return None
    host = cpu_budget(workers_here) if device == "cuda" else None
    verdict = judge(recipe, world_size, device, budget, host)
    return None if verdict.fits else f"will not fit in memory: {verdict.message()}"


def offload_disk_problem(recipe, world_size: int, workers_here: int, device: str, run_dir: Path | None) -> str | None:
    """None if this node's ranks' nvme offload files fit where they go (or there are none)."""
    if recipe.launch.memory_check == "off" or run_dir is None:
        return None
    zero = recipe.parallel.zero
    if "nvme" not in (zero.offload_optimizer, zero.offload_params):
        return None
    per_rank = max(e.disk_total for e in estimate_recipe(recipe, world_size, device))
    return disk_problem(offload_folder(recipe, run_dir), per_rank, workers_here)


def unbuilt_offload(recipe, device: str) -> str | None:
    """An offload the workers would refuse on this device, said before any of them starts."""
    if device == "cuda" and recipe.parallel.zero.offload_params == "nvme":
        return ("parallel.zero.offload_params nvme is not built beside a GPU yet (its shards would go through a "
                "pinned host staging pool): use offload_params cpu (pinned host memory), with offload_optimizer "
                "nvme if the optimizer state must leave memory too")
    return None


def _problems(recipe, world_size: int, workers: int, device: str, run_dir: Path | None) -> list[str]:
    found = [memory_problem(recipe, world_size, workers, device),
             offload_disk_problem(recipe, world_size, workers, device, run_dir)]
    return [p for p in found if p]


def check_memory(recipe, plan, launcher: str, run_dir: Path | None = None) -> list[str]:
    """The launcher's check of its own machine: warnings to print, or UserInputError."""
    if launcher != "local":
        return []  # each node agent checks its own machine before it starts workers
    path_problem = nvme_path_problem(recipe)  # the workers would refuse it whatever memory_check says
    if path_problem:
        raise UserInputError(path_problem)
    device = "cuda" if plan.backend == "nccl" else "cpu"
    unbuilt = unbuilt_offload(recipe, device)
    if unbuilt:
        raise UserInputError(unbuilt)
    workers = sum(len(node.slots) for node in plan.nodes)
    problems = _problems(recipe, plan.world_size, workers, device, run_dir)
    if problems and recipe.launch.memory_check == "error":
        raise UserInputError(f"{problems[0]} {OVERRIDE}")
    return problems


def check_node(recipe, world_size: int, nproc: int, run_dir: Path | None = None) -> str | None:
    """A node agent's check of its machine, before its workers start."""
    path_problem = nvme_path_problem(recipe)
    if path_problem:
        return path_problem
    if recipe.launch.memory_check != "error":
        return None
    try:
        import torch

        device = "cuda" if recipe.launch.backend != "gloo" and torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    unbuilt = unbuilt_offload(recipe, device)
    if unbuilt:
        return unbuilt
    problems = _problems(recipe, world_size, nproc, device, run_dir)
    return f"{problems[0]} {OVERRIDE}" if problems else None


def memory_summary(recipe, plan, run_dir: Path) -> dict:
    """For the dry-run: the largest rank's estimate by where it lives (bytes per rank; disk
    also per node), the offload folder, and what offload means here."""
    device = "cuda" if plan.backend == "nccl" else "cpu"
    estimates = estimate_recipe(recipe, plan.world_size, device)
    largest = max(estimates, key=lambda e: e.total)
    disk = max(e.disk_total for e in estimates)
    ranks_per_node = max(len(node.slots) for node in plan.nodes)
    zero = recipe.parallel.zero
    return {"device": device, "device_bytes_per_rank": round(largest.device_total),
            "host_bytes_per_rank": round(largest.host_total), "checked_bytes_per_rank": round(largest.total),
            "disk_bytes_per_rank": round(disk), "disk_bytes_per_node": round(disk * ranks_per_node),
            "offload_optimizer": zero.offload_optimizer, "offload_params": zero.offload_params,
            "offload_folder": str(offload_folder(recipe, run_dir)) if disk else None, "notes": largest.notes}


def describe_summary(summary: dict) -> str:
    """The dry-run's memory line."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    text = f"about {gib(summary['checked_bytes_per_rank'])} per rank"
    if summary["host_bytes_per_rank"]:
        text += (f" (of which host {gib(summary['host_bytes_per_rank'])}: on CPU the same memory)"
                 if summary["device"] == "cpu" else f", and {gib(summary['host_bytes_per_rank'])} of host memory")
    if summary["disk_bytes_per_rank"]:
        text += (f"; disk {gib(summary['disk_bytes_per_rank'])} per rank, {gib(summary['disk_bytes_per_node'])} per "
                 f"node under {summary['offload_folder']}")
    return "; ".join([text, *summary["notes"]])
