"""One loop for moving a buffer's bytes to or from a file: preadv / pwritev may each move fewer
bytes than asked (and Linux moves at most about 2 GiB per call), so both the offload store and
the bench's disk probe, which must move bytes as the store does, call this until all moved.
Torch-free: the bench's parent process uses it."""

from __future__ import annotations

import os

MAX_IO_BYTES = 1 << 30  # per call: under Linux's per-call limit of 2 GiB - 4 KiB


def move_all(call, fd: int, view: memoryview, offset: int) -> None:
    """os.preadv or os.pwritev of every byte of `view` (a flat byte view) at `offset`."""
    done = 0
    while done < len(view):
        moved = call(fd, [view[done : done + MAX_IO_BYTES]], offset + done)
        if moved <= 0:
            raise OSError(f"file I/O moved no bytes at offset {offset + done} (the file ends at "
                          f"{os.fstat(fd).st_size}; disk full?)")
        done += moved
