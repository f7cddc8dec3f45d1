"""Files sent from a node to the launcher as text lines on the runner's stderr.

Every runner (ssh, pdsh, srun, mpirun) carries a node's stderr back line by line, so a
node without the shared run directory sends its logs that way: each file as compressed,
base64-encoded chunks short enough for any of them, one per line:

    SDTRAIN_FILE <relative path> <chunk index> <chunk count> <base64 data>

The launcher takes such a line only at the start of a line, from the node agent's own
channel (channel.py: nothing else on the node can write one there), and only for the
files a node sends (SENT_BACK) that are that node's own (Sender: its failure and hang
reports, the logs and heartbeats of the ranks the plan gave it, and metrics and summary
from the node of rank 0 alone; a node cannot write another's report); it writes each file
under its run directory once every chunk has arrived. What a node sends is still untrusted
data: whatever arrives, a line that does not hold a sound chunk, a file that arrives
damaged, too large or that cannot be written here becomes a note (`notes`), never an
exception, and the launcher's memory stays bounded: MAX_PENDING_BYTES of chunks held, each
chunk and file charged for its bookkeeping too (a flood of empty chunks is not free), at
most MAX_PENDING_FILES_PER_NODE files of one node under way, and every file decompressed a
piece at a time to disk.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sdtrain.launch.disk import describe

FILE_PREFIX = "SDTRAIN_FILE "
CHUNK = 12_000  # base64 characters per line (a multiple of 4: each chunk decodes alone); well under any line buffer
MAX_FILE_BYTES = 512 * 2**20  # a file larger than this once decompressed is not written
MAX_PENDING_BYTES = 64 * 2**20  # chunks held for files not yet complete, all files together
# What holding a chunk or a file costs beyond its characters (measured: ~85 and ~380 bytes),
# charged against MAX_PENDING_BYTES: a million empty chunks once took 380 MiB uncounted.
CHUNK_OVERHEAD = 128
FILE_OVERHEAD = 1024
# A node sends its files one after the other (the hang watchdog's report may overlap the
# rest): more under way at once is a node that never finishes them.
MAX_PENDING_FILES_PER_NODE = 8
_PIECE = 2**20  # decompressed bytes held at once while a file is written

# What a node sends back (rundir.files_to_send, its ranks' heartbeats, the hang watchdog, the
# comm bench's result): nothing else is ever written, whatever path a line names (never
# checkpoints/, never `..`); and of these, only a node's own (Sender.may_send).
_RANK = r"(0|[1-9]\d{0,8})"  # as the node writes it: no leading zeros, no 5,000-digit number
_RANK_FILES = (re.compile(rf"logs/rank{_RANK}\.log"), re.compile(rf"progress/rank{_RANK}\.json"))
RANK0_FILES = ("metrics.jsonl", "summary.json", "comm.json")  # written by global rank 0 alone
SENT_BACK = re.compile(rf"logs/rank{_RANK}\.log|progress/rank{_RANK}\.json|failures/node{_RANK}\.json|"
                       rf"hang/node{_RANK}\.json|metrics\.jsonl|summary\.json|comm\.json")


@dataclass(frozen=True)
class Sender:
    """A node as the launch plan knows it, whatever its lines claim: the files it may send
    back are its own. Without this, node 1 could write failures/node0.json, and a forged
    node-0 report would become the root cause."""

    node_rank: int
    ranks: range  # the global ranks of its workers

    def may_send(self, relative: str) -> bool:
        if relative in (f"failures/node{self.node_rank}.json", f"hang/node{self.node_rank}.json"):
            return True
        if relative in RANK0_FILES:
            return 0 in self.ranks
        for pattern in _RANK_FILES:
            match = pattern.fullmatch(relative)
            if match:
                return int(match.group(1)) in self.ranks
        return False

    def describe(self) -> str:
        first, last = self.ranks.start, self.ranks.stop - 1
        held = "no rank" if not self.ranks else f"rank {first}" if first == last else f"ranks {first}-{last}"
        return f"node {self.node_rank}" if self.ranks == WHOLE_JOB.ranks else f"node {self.node_rank} ({held})"


# A job of one node: it holds every rank (what a receiver fed without a sender assumes).
WHOLE_JOB = Sender(0, range(2**63 - 1))


def senders(nodes) -> list[Sender]:
    """Each node of a plan (in rank order) and the global ranks its slots hold."""
    result, first = [], 0
    for node in nodes:
        result.append(Sender(node.node_rank, range(first, first + len(node.slots))))
        first += len(node.slots)
    return result


def held_cost(characters: int) -> int:
    """What the receiver charges for holding a whole file of `characters` base64 characters."""
    return FILE_OVERHEAD + characters + max(1, -(-characters // CHUNK)) * CHUNK_OVERHEAD


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
        if size > MAX_FILE_BYTES or held_cost(len(data)) > MAX_PENDING_BYTES:
            yield (f"sdtrain node: {relative} ({size / 2**20:,.0f} MiB) is too large to send back "
                   f"(at most {MAX_FILE_BYTES // 2**20} MiB, {MAX_PENDING_BYTES // 2**20} MiB compressed); it stays at {path}")
            continue
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [""]
        for index, chunk in enumerate(chunks):
            yield f"{FILE_PREFIX}{relative} {index} {len(chunks)} {chunk}"


@dataclass
class _Pending:
    """A file whose chunks are arriving."""

    sender: Sender
    count: int
    chunks: dict[int, str] = field(default_factory=dict)
    cost: int = FILE_OVERHEAD  # what it holds, as charged against MAX_PENDING_BYTES


class FileReceiver:
    """Collects SDTRAIN_FILE lines (in any order, several files interleaved, from several
    nodes' reader threads) and writes each file under `run_dir` once it is complete."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.parts: dict[str, _Pending] = {}  # path -> its chunks so far, oldest first
        self.pending_bytes = 0  # the cost of self.parts: characters and bookkeeping
        self.written: list[Path] = []
        self.notes: list[str] = []  # what was refused, for the launcher to print; it empties the list
        self._lock = threading.Lock()

    def feed(self, line: str, sender: Sender = WHOLE_JOB) -> bool:
        """True if the line is a file chunk line: consumed, or refused with a note.
        `sender`: the node whose channel the line came on (a launch's reader always says)."""
        if not line.startswith(FILE_PREFIX):
            return False
        fields = line[len(FILE_PREFIX):].rstrip("\n").split(" ")
        if len(fields) != 4:
            return False
        with self._lock:
            self._take(sender, *fields)
        return True

    def _take(self, sender: Sender, relative: str, index: str, count: str, chunk: str) -> None:
        if not SENT_BACK.fullmatch(relative):
            self.notes.append(f"{relative[:200]!r} is not a file a node sends back (rank logs and heartbeats, failure "
                              "and hang reports, metrics, summary): not written")
            return
        if not sender.may_send(relative):
            self.notes.append(f"{relative} is not a file of {sender.describe()} (a node sends its own reports, the "
                              "logs of its ranks, and metrics only from rank 0's node): not written")
            return
        try:
            index, count = int(index), int(count)
        except ValueError:
            self.notes.append(f"a file chunk line with chunk numbers {index[:20]!r} {count[:20]!r}: ignored")
            return
        pending = self.parts.get(relative)
        expected = count if pending is None else pending.count
        if not 0 <= index < count or count != expected:
            self.notes.append(f"{relative}: chunk {index} of {count} does not fit (expected {expected} chunks): "
                              "the file is not written")
            self._drop(relative)
            return
        if pending is None:
            pending = self._start(sender, relative, count)
        added = len(chunk) - len(pending.chunks.get(index, "")) + (0 if index in pending.chunks else CHUNK_OVERHEAD)
        pending.chunks[index] = chunk
        pending.cost += added
        self.pending_bytes += added
        if self.pending_bytes > MAX_PENDING_BYTES:
            # The file holding the most goes: one that never completes cannot starve the others.
            largest = max(self.parts, key=lambda path: self.parts[path].cost)
            self.notes.append(f"{largest}: more than {MAX_PENDING_BYTES // 2**20} MiB of chunks waiting for the rest "
                              "of their files: the largest, this one, is dropped")
            self._drop(largest)
            if largest == relative:
                return
        if len(pending.chunks) == count:
            self._drop(relative)
            self._write(relative, [pending.chunks[i] for i in range(count)])

    def _start(self, sender: Sender, relative: str, count: int) -> _Pending:
        """A new file under way; the sender's oldest goes if it has too many."""
        under_way = [path for path, pending in self.parts.items() if pending.sender == sender]
        if len(under_way) >= MAX_PENDING_FILES_PER_NODE:
            self.notes.append(f"{under_way[0]}: {sender.describe()} has more than {MAX_PENDING_FILES_PER_NODE} files "
                              "arriving at once: the oldest, this one, is dropped")
            self._drop(under_way[0])
        pending = self.parts[relative] = _Pending(sender, count)
        self.pending_bytes += pending.cost
        return pending

    def _drop(self, relative: str) -> None:
        pending = self.parts.pop(relative, None)
        if pending is not None:
            self.pending_bytes -= pending.cost

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
