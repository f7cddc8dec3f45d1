"""A remote node agent's own channel to the launcher.

The launcher reads a remote node's stderr and takes two kinds of line in it as the node
agent's word: file chunks (collect.py) and failure reports (failures.py), each only at the
start of a line. Everything else on the node that writes to that stderr (its workers before
their output goes to their logs, torch, libraries, an error message quoting a worker's
data) must never be taken for one. So the agent keeps the runner's stderr for itself, on a
descriptor no child inherits, and gives everything else, its own Python stderr included, a
pipe that it reads and passes on: a line of theirs that would start like one of the
agent's is passed on behind a mark, as text.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

from sdtrain.launch.collect import FILE_PREFIX
from sdtrain.launch.failures import REPORT_PREFIX

MARKERS = (FILE_PREFIX.encode(), REPORT_PREFIX.encode())
MARK = b"(not from the node agent) "
PIECE = 64 * 2**10  # a longer line is passed on in pieces: the agent never holds one whole


class AgentChannel:
    """Open it before anything else starts: from then on fd 2 is the relay's pipe."""

    def __init__(self):
        self.fd = os.dup(2)  # the runner's stderr; non-inheritable, so the workers never get it
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)  # this process's stderr, and that of everything it starts
        os.close(write_fd)
        self._lock = threading.Lock()
        self._at_line_start = True  # where the launcher's reading of the channel stands
        self._relay = threading.Thread(target=self._pass_on, args=(read_fd,), name="sdtrain-relay", daemon=True)
        self._relay.start()
        atexit.register(self.close)  # the agent's own last traceback, if it dies of one, still reaches the launcher

    def send(self, text: str) -> None:
        """The agent's own line(s), verbatim; a line after the first that starts like a
        marker is marked (a message may quote something else's words)."""
        lines = text.rstrip("\n").split("\n")
        data = b"".join(line.encode(errors="replace") + b"\n" for line in lines[:1])
        data += b"".join(self._marked(line.encode(errors="replace")) + b"\n" for line in lines[1:])
        with self._lock:
            self._write((b"" if self._at_line_start else b"\n") + data)
            self._at_line_start = True

    def close(self, wait_s: float = 2.0) -> None:
        """fd 2 back to the runner's stderr, and what the others wrote passed on first
        (the relay ends once no process of the node holds the pipe). Twice is harmless."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.fd, 2)
        self._relay.join(timeout=wait_s)

    def _pass_on(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as stream:
            while True:
                piece = stream.readline(PIECE)
                if not piece:
                    return
                with self._lock:
                    # A piece that starts a line on the channel (a new line, or the rest of
                    # one the agent's own line cut in two) never starts like a marker.
                    self._write(self._marked(piece) if self._at_line_start else piece)
                    self._at_line_start = piece.endswith(b"\n")

    def _write(self, data: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # the launcher is gone (lifeline.py stops the node); keep draining the pipe

    @staticmethod
    def _marked(line: bytes) -> bytes:
        return MARK + line if line.startswith(MARKERS) else line
