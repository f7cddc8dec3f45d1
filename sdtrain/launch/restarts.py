"""Automatic restart (launch.max_restarts): a failed job starts again from its newest
verified checkpoint, every node of it.

A failure anywhere already stops every worker on every node (supervise.py's fail-fast).
The launcher then starts the whole fleet again, as it started it the first time, with the
next attempt number (node agent `--attempt N`, the workers' SDTRAIN_ATTEMPT) and the newest
checkpoint of the run that passes the launch's own verification (resume_target.py), or the
first launch's resume target if none does (step 0 for a fresh run). Starting every node afresh, rather
than asking agents to restart their workers, needs nothing new of the nodes: whatever
reached them the first time (ssh, pdsh, srun, mpirun) reaches them again, and no agent of
a failed attempt survives into the next.

Restarts back off: attempt N starts BACKOFF_BASE_S x 2^(N-1) seconds after the failure, at most
BACKOFF_MAX_S (a crash loop then costs a minute an attempt, not a hammering of a sick node or
a shared filesystem); the recipe bounds launch.max_restarts.

Each restart is printed, appended to `restarts.jsonl` in the run directory, and counted in
`summary.json` (`restarts`, `restart_causes`). Not restarted: a stop by a signal, a node
that refused its input (exit 2), and a non-finite loss under on_nonfinite stop (the same
steps would give it again).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from sdtrain.launch.drills import hang_injected, injected_by, naming_the_drill
from sdtrain.launch.failures import merge_reports, read_reports, root_cause
from sdtrain.launch.hang_report import hang_diagnosis
from sdtrain.launch.resume_target import restart_target
from sdtrain.launch.supervise import JobOutcome

RESTARTS_FILE = "restarts.jsonl"
NOT_RESTARTED = ("NonFiniteError",)  # errors that the same steps would raise again
# 1 s keeps a test's single restart quick; doubling reaches the cap by the 7th attempt.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


def backoff_s(attempt: int) -> float:
    """How long attempt `attempt` (1 for the first restart) waits after the failure."""
    return min(BACKOFF_BASE_S * 2.0 ** (attempt - 1), BACKOFF_MAX_S)


def failure_cause(job, outcome: JobOutcome) -> dict:
    """The root cause of a failed attempt, in one small record."""
    from_files, _ = read_reports(job.run_dir / "failures")
    hosts = {n.node_rank: n.host for n in job.plan.nodes} if job.remote else None
    reports = merge_reports(from_files, outcome.reports, hosts)
    failures = [f for report in reports for f in report["failures"]]
    if failures:
        cause = root_cause(failures)
        error = (cause["error"] or "").strip().splitlines()
        hang = hang_diagnosis(job.run_dir, job.plan.world_size) if any(r.get("hang") for r in reports) else None
        # A drill's failure never reads as a real one: the restart line, restarts.jsonl and
        # summary.json's restart_causes say "injected", as the failure report does.
        if hang is not None:  # the watchdog's SIGKILLs are not the cause: the hang it diagnosed is
            return {"rank": None, "host": None, "exit": "stopped by the hang watchdog",
                    "error": naming_the_drill(hang[0], hang_injected(*hang, job.drills)), "timestamp": cause["timestamp"]}
        return {"rank": cause["rank"], "host": cause["host"], "exit": cause["exit"],
                "error": naming_the_drill(error[-1] if error else "", injected_by(cause, job.drills)),
                "timestamp": cause["timestamp"]}
    codes = [code for code in outcome.exit_codes if code not in (None, 0)]
    why = "; ".join(outcome.errors) or f"a node exited with {codes[0] if codes else 'no code'} before any rank reported"
    return {"rank": None, "host": None, "exit": f"exit code {codes[0]}" if codes else "", "error": why,
            "timestamp": time.time()}


def describe_cause(cause: dict) -> str:
    where = f"rank {cause['rank']} on {cause['host']} {cause['exit']}" if cause["rank"] is not None else cause["exit"]
    return f"{where}: {cause['error']}" if cause["error"] else where


def restartable(outcome: JobOutcome, cause: dict) -> bool:
    if outcome.interrupted is not None:
        return False
    if 2 in outcome.exit_codes and cause["rank"] is None:  # a node refused its input: it would again
        return False
    return not cause["error"].startswith(NOT_RESTARTED)


def archive_failures(run_dir: Path, attempt: int) -> None:
    """The failed attempt's reports move to failures/attempt<N>/: the next attempt's are
    then the only ones the final report reads."""
    folder = run_dir / "failures"
    reports = list(folder.glob("node*.json")) if folder.is_dir() else []
    if reports:
        (folder / f"attempt{attempt}").mkdir(exist_ok=True)
        for report in reports:
            shutil.move(report, folder / f"attempt{attempt}" / report.name)


def record_restart(run_dir: Path, record: dict) -> None:
    with (run_dir / RESTARTS_FILE).open("a") as f:
        f.write(json.dumps(record) + "\n")


def count_in_summary(run_dir: Path, causes: list[dict]) -> None:
    """summary.json (written by rank 0 of the last attempt) gets the restarts of the job."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    summary["restarts"] = len(causes)
    summary["restart_causes"] = [describe_cause(c) for c in causes]
    path.write_text(json.dumps(summary, indent=2))


def run_with_restarts(job, run_attempt: Callable[[list[list[str]]], JobOutcome],
                      say: Callable[[str], None]) -> tuple[JobOutcome, list[dict]]:
    """Run the job, restarting it after a failure up to launch.max_restarts times.
    Returns the last attempt's outcome and the cause of every failed attempt."""
    max_restarts = job.recipe.launch.max_restarts
    causes: list[dict] = []
    attempt, resume = 0, job.resume_from
    while True:
        outcome = run_attempt(job.commands_for_attempt(str(resume or ""), attempt))
        if outcome.ok or outcome.interrupted is not None:
            break
        cause = failure_cause(job, outcome)
        causes.append(cause)
        if attempt >= max_restarts or not restartable(outcome, cause):
            break
        archive_failures(job.run_dir, attempt)
        stopped_at = time.time()
        attempt += 1
        delay = backoff_s(attempt)
        say(f"restart {attempt}/{max_restarts} after a failure of attempt {attempt - 1}: {describe_cause(cause)}; "
            f"back-off {delay:g} s")
        # The verification (seconds: it imports torch into the launcher) is part of the wait.
        resume, skipped, go_on = restart_target(job)
        verified_at = time.time()
        for note in skipped:
            say(f"note: {note}")
        if not go_on:
            say(f"not restarted: the job resumed from {job.resume_from}, and no checkpoint passes verification now")
            break
        fresh = "no checkpoint passes verification" if skipped else "no checkpoint yet"
        say(f"restart {attempt}: " + (f"resuming from {resume}" if resume else f"{fresh}: starting over from step 0"))
        time.sleep(max(0.0, stopped_at + delay - time.time()))
        record_restart(job.run_dir, {
            "attempt": attempt, "cause": cause, "resume_from": str(resume) if resume else None,
            "resume_step": int(resume.name.removeprefix("step_")) if resume and resume.name.startswith("step_") else 0,
            "failed_at": cause["timestamp"], "stopped_at": stopped_at, "verified_at": verified_at,
            "restarted_at": time.time(), "backoff_s": delay, "skipped_checkpoints": skipped,
        })
    if outcome.ok:
        count_in_summary(job.run_dir, causes)
    return outcome, causes
