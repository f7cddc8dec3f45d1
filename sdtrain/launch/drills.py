"""Fault-injection drills as the launcher sees them (the drills themselves: train/faults.py).

A drill makes a run fail on purpose, and its failure must never read as a real one: a
planted NaN once made the report advise "Lower train.lr". So whenever an SDTRAIN_INJECT_*
variable reaches the workers, the launch opens with a banner naming each drill and where it
was set, and the failure report says when the root cause is the drill's doing, or that a
drill was active and the failure does not look like its doing.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from sdtrain.launch.exports import EnvFile, load_env_file
from sdtrain.train.faults import ADDRESS_LIMIT, active_drills, check_drills, parse_address_limit

HANG = "SDTRAIN_INJECT_HANG"


@dataclass(frozen=True)
class ActiveDrill:
    name: str
    value: str
    source: str  # where it was set: a .sdtrain_env path, or the launcher's environment

    def __str__(self) -> str:
        return f"{self.name}={self.value} (from {self.source})"


def drills_reaching_workers(worker_env: dict[str, str], env_file: EnvFile) -> list[ActiveDrill]:
    """The drills in the environment the workers get; `env_file`'s win, as they do there."""
    return [ActiveDrill(name, value, str(env_file.path) if name in env_file.variables else "the launcher's environment")
            for name, value in active_drills(worker_env).items()]


def drills_of_launches_from_here(environ: dict[str, str], allowed: Collection[str] = ()) -> list[ActiveDrill]:
    """The drills a local `sdtrain launch` started from this directory would run (a bench's
    entries are such launches): `environ` plus the `.sdtrain_env` that applies. UserInputError,
    before anything starts, for a guarded name of that file not `allowed` or a malformed drill,
    as the launch itself would refuse them."""
    env_file = load_env_file(Path.cwd(), Path.home(), allowed)
    worker_env = {**environ, **env_file.variables}
    check_drills(worker_env)
    return drills_reaching_workers(worker_env, env_file)


def banner(drills: list[ActiveDrill]) -> str:
    lines = [f"  {drill}" for drill in drills]
    return "\n".join(["fault-injection drill active: this run fails on purpose, and its report says \"injected\"",
                      *lines])


def injected_by(failure: dict, drills: list[ActiveDrill]) -> ActiveDrill | None:
    """The drill that caused `failure` (a rank's failure, as report.py reads it), if any.
    The fault and NaN drills name themselves in the error they raise; the address-space limit
    shows as its rank running out of memory."""
    text = (failure.get("error") or "") + "\n" + (failure.get("traceback") or "")
    for drill in drills:
        if drill.name == ADDRESS_LIMIT:
            if failure.get("oom") and failure.get("rank") == parse_address_limit(drill.value)[0]:
                return drill
        elif f"{drill.name}=" in text:
            return drill
    return None


def hang_injected(cause: str, lines: list[str], drills: list[ActiveDrill]) -> ActiveDrill | None:
    """The hang drill, when the hang diagnosis finds a rank asleep in it."""
    drill = next((d for d in drills if d.name == HANG), None)
    return drill if drill is not None and any("inject_hang" in text for text in (cause, *lines)) else None


def naming_the_drill(text: str, drill: ActiveDrill | None) -> str:
    """`text` (a failure's one-line cause) naming the drill that caused it, as the fault and NaN
    drills' own errors do; a hang or an address-space limit says nothing of a drill itself."""
    if drill is None or f"{drill.name}=" in text:
        return text
    return f"{text} (injected by {drill.name}={drill.value})"


def injected_line(drill: ActiveDrill) -> str:
    return f"injected by {drill}: a drill, not a real failure (unset {drill.name} for a real run)"


def not_injected_note(drills: list[ActiveDrill]) -> str:
    names = ", ".join(f"{d.name}={d.value}" for d in drills)
    return f"note: drill(s) active ({names}), but this failure does not look like their doing"
