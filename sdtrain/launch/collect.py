"""Files sent from a node to the launcher as text lines on the runner's stderr.

Every runner (ssh, pdsh, srun, mpirun) carries a node's stderr back line by line, so a
node without the shared run directory sends its logs that way: each file as compressed,
base64-encoded chunks short enough for any of them, one per line:

    SDTRAIN_FILE <relative path> <chunk index> <chunk count> <base64 data>

The launcher picks these lines out of the stream and writes the files under its run
directory once every chunk of a file has arrived. Whatever a node sends, a line that
does not hold a sound chunk, a file that arrives damaged, or one that cannot be written
here becomes a note (`notes`), never an exception: the launcher must keep reading.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

from sdtrain.launch.disk import describe

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
        self.parts: dict[str, tuple[int, dict[int, str]]] = {}  # path -> (chunk count, chunks so far)
        self.written: list[Path] = []
        self.notes: list[str] = []  # what was refused, for the launcher to print; it empties the list

    def feed(self, line: str) -> bool:
        """True if the line was meant as a file chunk: consumed, or refused with a note."""
        start = line.find(FILE_PREFIX)
        if start < 0:
            return False
        fields = line[start + len(FILE_PREFIX):].rstrip("\n").split(" ")
        if len(fields) != 4:
            return False
        relative, index, count, chunk = fields
        try:
            index, count = int(index), int(count)
        except ValueError:
            self.notes.append(f"a file chunk line with chunk numbers {fields[1][:20]!r} {fields[2][:20]!r}: ignored")
            return True
        expected, parts = self.parts.setdefault(relative, (count, {}))
        if not 0 <= index < count or count != expected:
            self.notes.append(f"{relative[:200]}: chunk {index} of {count} does not fit (expected {expected} chunks): "
                              "the file is not written")
            del self.parts[relative]
            return True
        parts[index] = chunk
        if len(parts) == count:
            del self.parts[relative]
            self._write(relative, "".join(parts[i] for i in range(count)))
        return True

    def _write(self, relative: str, data: str) -> None:
        rel = PurePosixPath(relative)
        if rel.is_absolute() or ".." in rel.parts:
            self.notes.append(f"{relative[:200]}: outside the run directory, not written")
            return  # never write outside the run directory, whatever a node sends
        try:
            content = zlib.decompress(base64.b64decode(data, validate=True))
        except (binascii.Error, zlib.error, ValueError) as exc:
            self.notes.append(f"{relative[:200]} arrived damaged ({exc}): not written")
            return
        target = self.run_dir / rel
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        except OSError as exc:
            self.notes.append(f"{relative[:200]} cannot be written here: {describe(exc)}")
            return
        self.written.append(target)
