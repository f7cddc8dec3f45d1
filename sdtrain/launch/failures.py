"""Failure reports: what each dead rank said, and which one is the root cause.

When one rank dies, its peers usually fail a moment later inside a collective ("connection
closed by peer") or are stopped by the agent (SIGTERM). Those are symptoms. The root cause
is the earliest failure that is not a symptom; only when every failure looks like one do
we fall back to the earliest of them.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

REPORT_PREFIX = "SDTRAIN_FAILURE_REPORT "

_SYMPTOMS = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|ProcessGroupGloo|"
    r"NCCL communicator was aborted|Socket Timeout|recvBytes|Timed out waiting|"
    r"DistNetworkError|DistBackendError",
    re.IGNORECASE,
)


def describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def is_symptom(failure: dict) -> bool:
    """True for failures that are most likely a consequence of another rank's death."""
    if failure["exitcode"] == -signal.SIGTERM:
        return True
    return bool(_SYMPTOMS.search(failure.get("error") or ""))


def root_cause(failures: list[dict]) -> dict:
    primary = [f for f in failures if not is_symptom(f)] or failures
    return min(primary, key=lambda f: (f["timestamp"], f["rank"]))


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def read_reports(folder: Path) -> list[dict]:
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("node*.json"))]


def merge_reports(from_files: list[dict], from_streams: list[dict], hosts: dict[int, str] | None = None) -> list[dict]:
    """One report per node: the run directory's (shared filesystem) and the ones read from
    the nodes' stderr are the same reports; a node's failures are named by the host the
    plan gave it (the node's own hostname kept beside)."""
    by_node = {report["node_rank"]: report for report in [*from_files, *from_streams]}
    if hosts:
        for report in by_node.values():
            for failure in report["failures"]:
                failure.setdefault("hostname", failure["host"])
                failure["host"] = hosts.get(report["node_rank"], failure["host"])
    return [by_node[rank] for rank in sorted(by_node)]
