"""Files sent from a node to the launcher as text lines on the runner's stderr.

Every runner (ssh, pdsh, srun, mpirun) carries a node's stderr back line by line, so a
node without the shared run directory sends its logs that way: each file as compressed,
base64-encoded chunks short enough for any of them, one per line:

    SDTRAIN_FILE <relative path> <chunk index> <chunk count> <base64 data>

The launcher takes such a line only at the start of a line, from the node agent's own
channel (channel.py: nothing else on the node can write one there), and only for the
files a node sends (SENT_BACK); it writes each file under its run directory once every
chunk has arrived. What a node sends is still untrusted data: whatever arrives, a line
that does not hold a sound chunk, a file that arrives damaged, too large or that cannot be
written here becomes a note (`notes`), never an exception, and the launcher's memory stays
bounded (MAX_PENDING_BYTES of chunks held, decompressed a piece at a time to disk).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Iterator

from sdtrain.launch.disk import describe

FILE_PREFIX = "SDTRAIN_FILE "
CHUNK = 12_000  # base64 characters per line (a multiple of 4: each chunk decodes alone); well under any line buffer
MAX_FILE_BYTES = 512 * 2**20  # a file larger than this once decompressed is not written
MAX_PENDING_BYTES = 64 * 2**20  # chunks held for files not yet complete, all files together
_PIECE = 2**20  # decompressed bytes held at once while a file is written

# What a node sends back (rundir.files_to_send, the hang watchdog, the comm bench's result):
# nothing else is ever written, whatever path a line names (never checkpoints/, never `..`).
SENT_BACK = re.compile(r"logs/[A-Za-z0-9_.-]+\.log|failures/node\d+\.json|hang/node\d+\.json|"
                       r"metrics\.jsonl|summary\.json|comm\.json")


def encode_files(run_dir: Path, paths: list[Path]) -> Iterator[str]:
    """The file lines for `paths`; a file too large to be received becomes a plain line
    saying where it stays."""
    for path in paths:
        relative = path.relative_to(run_dir).as_posix()
        try:
            size = path.stat().st_size
            data = base64.b64encode(zlib.compress(path.read_bytes())).decode() if size <= MAX_FILE_BYTES else ""
        except OSError:
            continue
        if size > MAX_FILE_BYTES or len(data) > MAX_PENDING_BYTES:
            yield (f"sdtrain node: {relative} ({size / 2**20:,.0f} MiB) is too large to send back "
                   f"(at most {MAX_FILE_BYTES // 2**20} MiB, {MAX_PENDING_BYTES // 2**20} MiB compressed); it stays at {path}")
            continue
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [""]
        for index, chunk in enumerate(chunks):
            yield f"{FILE_PREFIX}{relative} {index} {len(chunks)} {chunk}"


class FileReceiver:
    """Collects SDTRAIN_FILE lines (in any order, several files interleaved, from several
    nodes' reader threads) and writes each file under `run_dir` once it is complete."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.parts: dict[str, tuple[int, dict[int, str]]] = {}  # path -> (chunk count, chunks so far)
        self.pending_bytes = 0  # characters held in self.parts
        self.written: list[Path] = []
        self.notes: list[str] = []  # what was refused, for the launcher to print; it empties the list
        self._lock = threading.Lock()

    def feed(self, line: str) -> bool:
        """True if the line is a file chunk line: consumed, or refused with a note."""
        if not line.startswith(FILE_PREFIX):
            return False
        fields = line[len(FILE_PREFIX):].rstrip("\n").split(" ")
        if len(fields) != 4:
            return False
        with self._lock:
            self._take(*fields)
        return True

    def _take(self, relative: str, index: str, count: str, chunk: str) -> None:
        if not SENT_BACK.fullmatch(relative):
            self.notes.append(f"{relative[:200]!r} is not a file a node sends back (logs, failure and hang reports, "
                              "metrics, summary): not written")
            return
        try:
            index, count = int(index), int(count)
        except ValueError:
            self.notes.append(f"a file chunk line with chunk numbers {index[:20]!r} {count[:20]!r}: ignored")
            return
        expected, parts = self.parts.setdefault(relative, (count, {}))
        if not 0 <= index < count or count != expected:
            self.notes.append(f"{relative}: chunk {index} of {count} does not fit (expected {expected} chunks): "
                              "the file is not written")
            self._drop(relative)
            return
        self.pending_bytes += len(chunk) - len(parts.get(index, ""))
        parts[index] = chunk
        if self.pending_bytes > MAX_PENDING_BYTES:
            # The file holding the most goes: one that never completes cannot starve the others.
            largest = max(self.parts, key=lambda path: sum(map(len, self.parts[path][1].values())))
            self.notes.append(f"{largest}: more than {MAX_PENDING_BYTES // 2**20} MiB of chunks waiting for the rest "
                              "of their files: the largest, this one, is dropped")
            self._drop(largest)
            if largest == relative:
                return
        if len(parts) == count:
            self._drop(relative)
            self._write(relative, [parts[i] for i in range(count)])

    def _drop(self, relative: str) -> None:
        _, parts = self.parts.pop(relative, (0, {}))
        self.pending_bytes -= sum(map(len, parts.values()))

    def _write(self, relative: str, chunks: list[str]) -> None:
        """Decompressed a piece at a time into a temporary file, renamed once whole: a file
        that inflates past MAX_FILE_BYTES costs neither memory nor a damaged file."""
        target = self.run_dir / relative
        partial = target.with_name(f".{target.name}.receiving")
        problem = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                problem = _inflate(chunks, out)
            if problem is None:
                os.replace(partial, target)
        except OSError as exc:
            problem = f"cannot be written here: {describe(exc)}"
        if problem is not None:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
            self.notes.append(f"{relative} {problem}")
            return
        self.written.append(target)


def _inflate(chunks: list[str], out) -> str | None:
    """Write the decompressed chunks to `out`; what is wrong with them, or None."""
    inflater, size = zlib.decompressobj(), 0
    try:
        for chunk in chunks:
            data = base64.b64decode(chunk, validate=True)
            while data:
                piece = inflater.decompress(data, _PIECE)
                size += len(piece)
                if size > MAX_FILE_BYTES:
                    return f"is larger than {MAX_FILE_BYTES // 2**20} MiB once decompressed: not written"
                out.write(piece)
                data = inflater.unconsumed_tail
    except (binascii.Error, zlib.error, ValueError) as exc:
        return f"arrived damaged ({exc}): not written"
    if not inflater.eof:
        return "arrived damaged (its compressed data ends early): not written"
    return None
