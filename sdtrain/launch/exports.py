"""The environment nodes get: selected variables of the launcher, plus `.sdtrain_env`.

Variables whose names start with NCCL_, PYTHON, CUDA_, OMP_ or SDTRAIN_ travel to every
node (CUDA_VISIBLE_DEVICES excepted: each node's slots decide its devices). A `.sdtrain_env`
file in the working directory, else in the home directory, adds KEY=VALUE lines and wins
over the launcher's environment. Values are plain strings here; the runners quote them for
whatever shell they pass through. A local launch's node agent inherits the launcher's
environment anyway, and gets `.sdtrain_env` on top, as remote nodes do.

The file is found, not named: a checkout someone else wrote can carry one, and one left in
the home directory applies to every later launch. So the names in GUARDED (env_guard.py:
variables that decide which code runs, and the drills that make a run fail on purpose) are
refused from it, before anything starts, unless the launch allows each by name
(--allow-env-file-var NAME). The launcher's own environment is the user's and passes as it
is. The file is read within bounds (user_files.py): a FIFO, a directory or a huge file there
is one line, not a hang or a MemoryError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.errors import UserInputError, excerpt
from sdtrain.launch.env_guard import guarded_reason
from sdtrain.user_files import read_text

EXPORTED_PREFIXES = ("NCCL_", "PYTHON", "CUDA_", "OMP_", "SDTRAIN_")
NOT_EXPORTED = {"CUDA_VISIBLE_DEVICES"}
ENV_FILE = ".sdtrain_env"
ALLOW_FLAG = "--allow-env-file-var"
# A few hundred variables at most; every value also has to fit a remote node's command line
# (one argument is at most 128 KiB on Linux). The bound keeps a huge file from costing the
# launcher gigabytes before it says anything.
MAX_ENV_FILE_BYTES = 1 << 20

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class EnvFile:
    """The `.sdtrain_env` a launch read (path None: there was none) and what it sets."""

    path: Path | None = None
    variables: dict[str, str] = field(default_factory=dict)

    def notice(self) -> str | None:
        """What the launch says it read: the names only (values may be secrets)."""
        if self.path is None:
            return None
        names = ", ".join(self.variables) or "nothing"
        return f"read {self.path}: sets {names}"


def launcher_exports(environ: dict[str, str]) -> dict[str, str]:
    """The launcher's variables that travel to remote nodes."""
    return {k: v for k, v in sorted(environ.items()) if k.startswith(EXPORTED_PREFIXES) and k not in NOT_EXPORTED}


def exported_environment(environ: dict[str, str], cwd: Path, home: Path, allowed: Collection[str] = ()) -> dict[str, str]:
    return {**launcher_exports(environ), **load_env_file(cwd, home, allowed).variables}


def load_env_file(cwd: Path, home: Path, allowed: Collection[str] = ()) -> EnvFile:
    """The `.sdtrain_env` that applies, checked: UserInputError for a bad line or a guarded
    name the launch did not allow."""
    path = find_env_file(cwd, home)
    if path is None:
        return EnvFile()
    variables = read_env_file(path)
    check_guarded(variables, path, allowed)
    return EnvFile(path, variables)


def check_guarded(variables: dict[str, str], path: Path, allowed: Collection[str] = ()) -> None:
    """Refuse the guarded names (env_guard.py) the launch did not allow, each with why."""
    refused = {name: guarded_reason(name) for name in variables if name not in allowed}
    refused = {name: why for name, why in refused.items() if why}
    if refused:
        flags = " ".join(f"{ALLOW_FLAG} {name}" for name in refused)
        whys = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise UserInputError(f"{path} sets {', '.join(refused)} ({whys}). A {ENV_FILE} is found, not named, so it may "
                             f"set such a variable only when the launch allows each by name ({flags}); "
                             "or remove them from the file")


def find_env_file(cwd: Path, home: Path) -> Path | None:
    """The first `.sdtrain_env` there is, whatever it is: a directory, a FIFO or a dangling link
    by that name is refused when read, not skipped (the launch would go on without the
    variables its owner put there, or with the home directory's instead)."""
    for folder in (cwd, home):
        if os.path.lexists(folder / ENV_FILE):
            return folder / ENV_FILE
    return None


def read_env_file(path: Path) -> dict[str, str]:
    try:
        text = read_text(path, "variables file", MAX_ENV_FILE_BYTES, form="KEY=VALUE lines")
    except UserInputError as exc:  # the user never named it: say where it came from
        raise UserInputError(f"{exc} (every launch reads {ENV_FILE} from the working directory, else the home "
                             "directory: make it a file of KEY=VALUE lines, or remove it)") from None
    return parse_env_file(text, str(path))


def parse_env_file(text: str, source: str = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines; `#` comment lines and blank lines are skipped; an optional
    `export ` prefix and one pair of matching quotes around the value are accepted."""
    env = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}: {excerpt(raw.strip())}"
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise UserInputError(f"{where}: expected KEY=VALUE with KEY a variable name (letters, digits, _)")
        value = value.strip()
        if value[:1] in ("'", '"'):
            if len(value) < 2 or value[-1] != value[0]:
                raise UserInputError(f"{where}: the value opens a {value[0]} quote and does not close it at the end")
            value = value[1:-1]
        env[key] = value
    return env
