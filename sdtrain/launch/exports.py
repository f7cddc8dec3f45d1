"""The environment nodes get: selected variables of the launcher, plus `.sdtrain_env`.

Variables whose names start with NCCL_, PYTHON, CUDA_, OMP_ or SDTRAIN_ travel to every
node (CUDA_VISIBLE_DEVICES excepted: each node's slots decide its devices). A `.sdtrain_env`
file in the working directory, else in the home directory, adds KEY=VALUE lines and wins
over the launcher's environment. Values are plain strings here; the runners quote them for
whatever shell they pass through. A local launch's node agent inherits the launcher's
environment anyway, and gets `.sdtrain_env` on top, as remote nodes do.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdtrain.errors import UserInputError, decode_utf8, excerpt

EXPORTED_PREFIXES = ("NCCL_", "PYTHON", "CUDA_", "OMP_", "SDTRAIN_")
NOT_EXPORTED = {"CUDA_VISIBLE_DEVICES"}
ENV_FILE = ".sdtrain_env"

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def exported_environment(environ: dict[str, str], cwd: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in sorted(environ.items()) if k.startswith(EXPORTED_PREFIXES) and k not in NOT_EXPORTED}
    path = find_env_file(cwd, home)
    if path is not None:
        env.update(read_env_file(path))
    return env


def env_file_variables(cwd: Path, home: Path) -> dict[str, str]:
    """`.sdtrain_env`'s variables alone (a local launch inherits the rest)."""
    path = find_env_file(cwd, home)
    return read_env_file(path) if path is not None else {}


def find_env_file(cwd: Path, home: Path) -> Path | None:
    for folder in (cwd, home):
        if (folder / ENV_FILE).is_file():
            return folder / ENV_FILE
    return None


def read_env_file(path: Path) -> dict[str, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read {path}: {exc.strerror}") from None
    return parse_env_file(decode_utf8(data, str(path)), str(path))


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
