"""Out of memory, named as such: which rank, the evidence, its last reading, the estimate,
the limit, and the changes that would fit.

A rank out of memory dies one of two ways. The allocator refuses (torch.OutOfMemoryError on
a GPU, "can't allocate memory" on a CPU): its traceback says so. Or the kernel kills it with
SIGKILL and no traceback, and the evidence is elsewhere: the cgroup's OOM-kill counter
(v2 memory.events, v1 memory.oom_control) going up while the job ran, or the kernel log's
"Killed process PID" where it is readable. Without either, a SIGKILL whose last memory
reading (train/memory_watch.py) was near the rank's limit is reported as *likely* out of
memory, and says it is a guess.
"""

from __future__ import annotations

import re
import signal
import subprocess

from sdtrain.estimate.fit import Budget, cgroup_dirs, cpu_budget
from sdtrain.estimate.terms import gib
from sdtrain.train.memory_watch import read_memory

ALLOCATOR_REFUSED = re.compile(r"OutOfMemoryError|CUDA out of memory|can't allocate memory|Cannot allocate memory|"
                               r"\bMemoryError\b|std::bad_alloc", re.IGNORECASE)
NEAR_LIMIT = 0.85  # a SIGKILLed rank whose last reading was this close to its limit: likely memory
_kills_at_start: int | None = None


def oom_kills() -> int | None:
    """The OOM kills the memory cgroup has counted (None where no cgroup file says)."""
    for version, folder in cgroup_dirs():
        name = "memory.events" if version == 2 else "memory.oom_control"
        try:
            text = (folder / name).read_text()
        except OSError:
            continue
        match = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def arm() -> None:
    """Remember the cgroup's OOM-kill count before the workers start."""
    global _kills_at_start
    _kills_at_start = oom_kills()


def kernel_log_says(pid) -> str | None:
    """The kernel log's line about the OOM killer killing `pid`, where dmesg is readable."""
    try:
        log = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=3).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in log.splitlines() if re.search(rf"Killed process {pid}\b|oom-kill:.*pid={pid}\b", line)]
    return lines[-1].strip() if lines else None


def diagnose(failure: dict, run_dir, nproc: int) -> dict | None:
    """{"certain", "evidence", "last_bytes", "limit_bytes", "limit_source"} when `failure`
    is a rank out of memory (or likely so); None otherwise. Runs on the rank's node."""
    reading = read_memory(run_dir, failure["rank"]) or {}
    last = reading.get("cuda_allocated", reading.get("rss"))
    if "limit" in reading:
        budget = Budget(reading["limit"], "the rank's address-space limit (SDTRAIN_INJECT_ADDRESS_LIMIT)")
    else:
        budget = cpu_budget(nproc)
    found = {"last_bytes": last, "peak_bytes": reading.get("cuda_peak", reading.get("peak_rss")),
             "limit_bytes": budget.per_rank, "limit_source": budget.source}
    text = "\n".join(failure.get(key) or "" for key in ("error", "traceback", "log_tail"))
    refused = ALLOCATOR_REFUSED.search(text)
    if refused:
        line = next(line for line in text.splitlines() if ALLOCATOR_REFUSED.search(line))
        return {**found, "certain": True, "evidence": f"the allocator refused: {line.strip()[:300]}"}
    if failure["exitcode"] != -signal.SIGKILL:
        return None
    kernel = kernel_log_says(failure["pid"])
    if kernel:
        return {**found, "certain": True, "evidence": f"kernel log: {kernel}"}
    kills = oom_kills()
    if kills is not None and _kills_at_start is not None and kills > _kills_at_start:
        return {**found, "certain": True,
                "evidence": f"the memory cgroup's oom_kill counter went from {_kills_at_start} to {kills} during the run"}
    if last and last >= NEAR_LIMIT * budget.per_rank:
        return {**found, "certain": False, "evidence": (
            f"likely: killed by SIGKILL with no traceback, and its last reading ({gib(last)}) was "
            f"{100 * last / budget.per_rank:.0f}% of what it may have; neither the kernel log nor a cgroup counter "
            "could confirm it here")}
    return None


def explain(job, finding: dict) -> str:
    """The report's text for a rank out of memory: evidence, numbers, changes that fit."""
    from sdtrain.estimate.verdict import judge

    device = "cuda" if job.plan.backend == "nccl" else "cpu"
    budget = Budget(finding["limit_bytes"], finding["limit_source"])
    verdict = judge(job.recipe, job.plan.world_size, device, budget)
    last = finding.get("last_bytes")
    lines = [
        ("out of memory" if finding["certain"] else "likely out of memory") + f": {finding['evidence']}",
        f"last measured memory of the rank: {gib(last) if last else 'no reading'}"
        + (f" (peak {gib(finding['peak_bytes'])})" if finding.get("peak_bytes") else ""),
        f"estimate per rank: {gib(verdict.estimate.total)} (largest terms: {verdict.largest_terms()})",
        f"limit: {budget.describe()}",
    ]
    if not verdict.suggestions:
        from sdtrain.estimate.suggest import suggest

        verdict.suggestions = suggest(job.recipe, job.plan.world_size, device, min(budget.per_rank, 0.9 * verdict.estimate.total))
    lines.append(verdict.advice())
    return "\n".join(lines)
