"""Writing into the run directory: whole files, and the filesystem's refusals named.

A full disk, a read-only filesystem or a missing permission makes every process that
writes there fail at once (workers, node agents, the launcher); the error each of them
raises is then the middle of a traceback. The launcher asks the directory itself instead
and says which of these it is. Files others read (failure reports, the recipe, the marker)
are written whole or not at all, so a full disk never leaves a truncated one.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Errors that are about the filesystem, not the program: the fix is on the machine.
DISK_ERRORS = {
    errno.ENOSPC: "free some space there, or give another --run-dir",
    errno.EDQUOT: "the disk quota is used up: free some space, or give another --run-dir",
    errno.EROFS: "the filesystem is mounted read-only: give a --run-dir on a writable one",
    errno.EACCES: "this user may not write there: fix its permissions, or give another --run-dir",
    errno.EPERM: "this user may not write there: fix its permissions, or give another --run-dir",
}


def describe(exc: OSError) -> str:
    """`No space left on device (ENOSPC) at /runs/x/recipe.yaml`: the errno by name, and the path."""
    name = errno.errorcode.get(exc.errno or 0, "")
    what = exc.strerror or str(exc)
    where = f" at {exc.filename}" if exc.filename else ""
    return f"{what}{f' ({name})' if name else ''}{where}"


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRORS


def fix_for(exc: OSError) -> str:
    return DISK_ERRORS.get(exc.errno or 0, "")


def unwritable(run_dir: Path) -> OSError | None:
    """The error writing into `run_dir` raises now, or None when it can be written.
    A few bytes, flushed: an empty file can still be made on a full disk."""
    probe = run_dir / f".sdtrain_write_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"sdtrain\n" * 512)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def write_whole(path: Path, text: str) -> None:
    """Write a file so that readers see all of it or none of it (a full disk mid-write leaves
    the temporary file, which is removed, never a truncated one)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            temp.unlink()
        except OSError:
            pass
        raise
