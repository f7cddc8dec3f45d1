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

from sdtrain.launch.disk import describe, write_whole

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


def only_symptoms(failures: list[dict]) -> bool:
    """True when every failure looks like the consequence of another's death (or there are none)."""
    return all(is_symptom(f) for f in failures)


def root_cause(failures: list[dict]) -> dict:
    primary = [f for f in failures if not is_symptom(f)] or failures
    return min(primary, key=lambda f: (f["timestamp"], f["rank"]))


TEXT_LIMIT = 16_000  # characters of a rank's error, traceback or log tail in a report


def clip(text: str, keep: str = "tail", limit: int = TEXT_LIMIT) -> str:
    """At most `limit` characters: the end of a traceback or log says why, the start of an error."""
    if len(text) <= limit:
        return text
    if keep == "head":
        return text[:limit] + f"\n... ({len(text) - limit:,} more characters cut)"
    return f"... ({len(text) - limit:,} characters cut)\n" + text[-limit:]


def report_line(report: dict, limit: int) -> str:
    """The report as the one line a remote node sends, at most `limit` bytes: where many
    ranks failed with long texts, only the root cause keeps its traceback and log tail."""
    line = REPORT_PREFIX + json.dumps(report)
    if len(line) <= limit:
        return line
    cause = report.get("root_cause")
    for failure in report["failures"]:
        if failure["rank"] != cause:
            failure.update(traceback="", log_tail="", error=clip(failure["error"], keep="head", limit=300))
    line = REPORT_PREFIX + json.dumps(report)
    if len(line) <= limit:
        return line
    for failure in report["failures"]:
        failure.update(traceback=clip(failure["traceback"], limit=1000), log_tail="",
                       error=clip(failure["error"], keep="head", limit=300))
    return REPORT_PREFIX + json.dumps(report)


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_report(report: dict, path: Path) -> None:
    """Whole or not at all: a full disk must not leave an empty report for the launcher."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(report, indent=2))


def read_reports(folder: Path) -> tuple[list[dict], list[str]]:
    """The reports in `folder`, and a note for each one that cannot be used: the launcher
    still prints what the others (and the nodes' stderr) say."""
    reports, notes = [], []
    for path in sorted(folder.glob("node*.json")) if folder.is_dir() else []:
        try:
            reports.append(checked_report(json.loads(path.read_bytes())))
        except OSError as exc:
            notes.append(f"the failure report {path} cannot be read: {describe(exc)}")
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            notes.append(f"the failure report {path} is broken ({exc}); a full disk leaves reports like that")
    return reports, notes


# What a failure must hold to be reported; the text fields may be missing (a node agent of
# another version) and are then empty.
_NUMBERS = {"rank": int, "exitcode": int, "timestamp": (int, float)}
_TEXTS = ("host", "exit", "error", "traceback", "log_tail")


def checked_report(report) -> dict:
    """`report` if it has the shape node agents write, with missing texts filled in;
    ValueError saying what is wrong otherwise (it came from another machine, or a disk)."""
    if not isinstance(report, dict) or not _is(report.get("node_rank"), int):
        raise ValueError("not an object with an integer node_rank")
    failures = report.get("failures")
    if not isinstance(failures, list) or not failures or not all(isinstance(f, dict) for f in failures):
        raise ValueError("no list of failures")
    for failure in failures:
        for key, kind in _NUMBERS.items():
            if not _is(failure.get(key), kind):
                raise ValueError(f"a failure without a number for {key!r}")
        for key in _TEXTS:
            if not isinstance(failure.setdefault(key, ""), str):
                raise ValueError(f"a failure whose {key!r} is not text")
        failure["exit"] = failure["exit"] or describe_exit(failure["exitcode"])
        failure.setdefault("local_rank", "?")
        failure.setdefault("pid", "?")
    return report


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


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
