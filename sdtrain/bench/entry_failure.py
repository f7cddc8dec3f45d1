"""A failed bench entry of sdtrain's own, in one message: the entry, the rank that failed first
and its error, and "injected" where a drill did it.

Each sdtrain entry is a real `sdtrain launch` whose output the bench keeps to itself. When one
fails, the bench stops (sdtrain's own failure is a bug to see, not a footnote in a table) and
says what that launch's report said, read from the failure reports the launch left in its run
directory (failures/, and hang/ where the watchdog stopped it). A drill's failure never reads as
a real one, in a bench as in a launch (launch/drills.py).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from sdtrain.launch.drills import (ActiveDrill, hang_injected, injected_by, injected_line, naming_the_drill,
                                   not_injected_note)
from sdtrain.launch.failures import describe_exit, read_reports, root_cause
from sdtrain.launch.hang_report import hang_diagnosis

ERROR_CHARS = 600  # a rank's error is one line; a long one is cut, the rerun shows it whole


class BenchEntryFailed(Exception):
    """An sdtrain entry of the bench failed: exit 1, as the failed launch it was."""

    exit_code = 1


def entry_failure(name: str, world: int, argv: list[str], run_dir: Path, returncode: int, output: str,
                  drills: list[ActiveDrill]) -> BenchEntryFailed:
    """Why the launch `argv` (run in `run_dir`, `returncode`, `output`) of entry `name` failed."""
    cause, drill = _reported_cause(run_dir, world, drills)
    if cause is None:  # no rank reported: the launch itself said why (its `error:` line, or its last)
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
        cause = f"the launch ended with {describe_exit(returncode)}: {said or '(no output)'}"
    message = [f"entry {name} (world {world}): {_cut(cause)}"]
    if drill is not None:
        message.append(injected_line(drill))
    elif drills:
        message.append(not_injected_note(drills))
    message.append(f"the entry alone, with the launch's whole report: {rerun_command(argv)}")
    return BenchEntryFailed("\n".join(message))


def _reported_cause(run_dir: Path, world: int, drills: list[ActiveDrill]) -> tuple[str | None, ActiveDrill | None]:
    """The root cause as the launch's report names it, and the drill behind it; (None, None)
    where no rank left a report."""
    reports, _ = read_reports(run_dir / "failures")
    failures = [failure for report in reports for failure in report["failures"]]
    if not failures:
        return None, None
    hang = hang_diagnosis(run_dir, world) if any(report.get("hang") for report in reports) else None
    if hang is not None:  # the watchdog's kills are not the cause: the hang it diagnosed is
        drill = hang_injected(*hang, drills)
        return f"stopped by the hang watchdog{_injected(drill)}: {naming_the_drill(hang[0], drill)}", drill
    cause = root_cause(failures)
    drill = injected_by(cause, drills)
    error = (cause["error"] or "").strip().splitlines()
    text = naming_the_drill(error[-1] if error else "(no error text)", drill)
    return f"rank {cause['rank']} {cause['exit']}{_injected(drill)}: {text}", drill


def _injected(drill: ActiveDrill | None) -> str:
    return " (injected)" if drill is not None else ""


def _cut(text: str) -> str:
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


def rerun_command(argv: list[str]) -> str:
    """`sdtrain launch ...` as a user types it: the bench's launch without its throwaway run dir."""
    args = argv[argv.index("launch"):]
    if "--run-dir" in args:
        at = args.index("--run-dir")
        del args[at:at + 2]
    return shlex.join(["sdtrain", *args])
