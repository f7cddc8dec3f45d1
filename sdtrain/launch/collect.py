"""Files sent from a node to the launcher as text lines on the runner's stderr.

Every runner (ssh, pdsh, srun, mpirun) carries a node's stderr back line by line, so a
node without the shared run directory sends its logs that way: each file as compressed,
base64-encoded chunks short enough for any of them, one per line:

    SDTRAIN_FILE <relative path> <chunk index> <chunk count> <base64 data>

The launcher picks these lines out of the stream and writes the files under its run
directory once every chunk of a file has arrived.
"""

from __future__ import annotations

import base64
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

FILE_PREFIX = "SDTRAIN_FILE "
CHUNK = 12_000  # base64 characters per line: well under any line buffer on the way


def encode_files(run_dir: Path, paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            data = base64.b64encode(zlib.compress(path.read_bytes())).decode()
        except OSError:
            continue
        relative = path.relative_to(run_dir).as_posix()
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [""]
        for index, chunk in enumerate(chunks):
            yield f"{FILE_PREFIX}{relative} {index} {len(chunks)} {chunk}"


class FileReceiver:
    """Collects SDTRAIN_FILE lines (in any order, several files interleaved) and writes
    each file under `run_dir` once it is complete."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.parts: dict[str, dict[int, str]] = {}
        self.written: list[Path] = []

    def feed(self, line: str) -> bool:
        """True if the line was a file chunk (and is consumed)."""
        start = line.find(FILE_PREFIX)
        if start < 0:
            return False
        fields = line[start + len(FILE_PREFIX):].rstrip("\n").split(" ")
        if len(fields) != 4:
            return False
        relative, index, count, chunk = fields
        parts = self.parts.setdefault(relative, {})
        parts[int(index)] = chunk
        if len(parts) == int(count):
            self._write(relative, "".join(parts[i] for i in range(int(count))))
            del self.parts[relative]
        return True

    def _write(self, relative: str, data: str) -> None:
        rel = PurePosixPath(relative)
        if rel.is_absolute() or ".." in rel.parts:
            return  # never write outside the run directory, whatever a node sends
        target = self.run_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(zlib.decompress(base64.b64decode(data)))
        self.written.append(target)
