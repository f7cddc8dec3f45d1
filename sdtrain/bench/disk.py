"""The disk's own sequential bandwidth where nvme offload writes, for the bench to put beside
the bandwidth offload achieved: a file of a few hundred MB written and read back in blocks of
the size offload moves (one sub-group's region, parallel.zero.sub_group_mb), with pwrite and
pread as the offload store does.

The write is timed through fsync (on the disk, not in the page cache). Before the read the
file's pages are dropped from the cache (posix_fadvise DONTNEED after fsync: this file only,
never the machine's whole cache); the read then goes through O_DIRECT where the filesystem
takes it (it bypasses the cache altogether), else through the emptied cache, and the result
says which. A read still served from memory would be far above any disk, so `read_mode`
is part of the number.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path

from sdtrain.estimate.disk import nearest_existing
from sdtrain.parallel.offload.vectored_io import move_all

MiB = 2**20
PROBE_BYTES = 256 * MiB


def probe_disk(folder: str | os.PathLike, block_bytes: int, total_bytes: int = PROBE_BYTES) -> dict:
    """{"path", "bytes", "block_bytes", "write_gbps", "read_gbps", "read_mode"} of the
    filesystem at `folder` (which must exist), GB/s as 10^9 bytes per second."""
    block_bytes, blocks, buffer = _probe_buffer(block_bytes, total_bytes)
    fd, name = tempfile.mkstemp(prefix=".sdtrain-disk-probe-", dir=folder)
    try:
        began = time.perf_counter()
        _writes(fd, buffer, blocks, block_bytes)
        os.fsync(fd)
        write_s = time.perf_counter() - began
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        read_s, mode = _read(name, fd, buffer, blocks, block_bytes)
    finally:
        os.close(fd)
        os.unlink(name)
        buffer.close()
    return _bandwidths(folder, blocks * block_bytes, block_bytes, write_s, read_s) | {"read_mode": mode}


def probe_page_cache(folder: str | os.PathLike, block_bytes: int, total_bytes: int = PROBE_BYTES) -> dict:
    """The same moves with the file left in the page cache (no fsync, nothing dropped): what
    offload's pwrite / pread get where its files fit in free memory, which is the usual case
    on a CPU machine. Offload rewrites the same regions every step, so the write timed is a
    rewrite of pages the cache already holds."""
    block_bytes, blocks, buffer = _probe_buffer(block_bytes, total_bytes)
    fd, name = tempfile.mkstemp(prefix=".sdtrain-cache-probe-", dir=folder)
    try:
        _writes(fd, buffer, blocks, block_bytes)  # the first step's: the cache takes the pages
        began = time.perf_counter()
        _writes(fd, buffer, blocks, block_bytes)
        write_s = time.perf_counter() - began
        read_s = _timed_reads(fd, buffer, blocks, block_bytes)
    finally:
        os.close(fd)
        os.unlink(name)
        buffer.close()
    return _bandwidths(folder, blocks * block_bytes, block_bytes, write_s, read_s)


def _probe_buffer(block_bytes: int, total_bytes: int) -> tuple[int, int, mmap.mmap]:
    """(block size, blocks, one block's page-aligned buffer of random bytes)."""
    block_bytes = max(mmap.PAGESIZE, block_bytes // mmap.PAGESIZE * mmap.PAGESIZE)  # O_DIRECT wants aligned sizes
    buffer = mmap.mmap(-1, block_bytes)  # page-aligned, as O_DIRECT needs
    buffer.write(os.urandom(min(block_bytes, MiB)) * (block_bytes // min(block_bytes, MiB)))
    return block_bytes, max(1, total_bytes // block_bytes), buffer


def _writes(fd: int, buffer: mmap.mmap, blocks: int, block_bytes: int) -> None:
    for i in range(blocks):
        move_all(os.pwritev, fd, memoryview(buffer), i * block_bytes)


def _bandwidths(folder, total: int, block_bytes: int, write_s: float, read_s: float) -> dict:
    return {"path": str(Path(folder)), "bytes": total, "block_bytes": block_bytes,
            "write_gbps": round(total / write_s / 1e9, 3), "read_gbps": round(total / read_s / 1e9, 3)}


def _read(name: str, fd: int, buffer: mmap.mmap, blocks: int, block_bytes: int) -> tuple[float, str]:
    """(seconds, how) for reading the file back: O_DIRECT where it opens and reads, else pread
    after the cache was dropped."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            direct_fd = os.open(name, os.O_RDONLY | direct)
        except OSError:
            direct_fd = None
        if direct_fd is not None:
            try:
                return _timed_reads(direct_fd, buffer, blocks, block_bytes), "O_DIRECT"
            except OSError:
                pass  # the filesystem opens it but refuses direct reads (tmpfs, some overlays)
            finally:
                os.close(direct_fd)
    return _timed_reads(fd, buffer, blocks, block_bytes), "page cache dropped (posix_fadvise), buffered pread"


def _timed_reads(fd: int, buffer: mmap.mmap, blocks: int, block_bytes: int) -> float:
    began = time.perf_counter()
    for i in range(blocks):
        move_all(os.preadv, fd, memoryview(buffer), i * block_bytes)
    return time.perf_counter() - began


def disk_beside_rows(recipe, tmp: str, notes: list[str]) -> dict:
    """The disk's own bandwidth where the nvme rows write (nvme_path, or the runs' folder under
    `tmp`), in blocks of one sub-group's region (what the offload store moves at once)."""
    zero = recipe.parallel.zero
    folder = nearest_existing(Path(zero.nvme_path).expanduser()) if zero.nvme_path else Path(tmp)
    disk = probe_disk(folder, int(zero.sub_group_mb * 2**20))
    notes.append(f"disk at {disk['path']} (the nvme rows' files): write {disk['write_gbps']:.2f} GB/s (fsync'd), "
                 f"read {disk['read_gbps']:.2f} GB/s ({disk['read_mode']}); {disk['bytes'] / 2**20:.0f} MiB in "
                 f"{disk['block_bytes'] / 2**20:.0f} MiB blocks with pwrite / pread, as offload moves them")
    return disk


def cached_reads(rows: list[dict], disk: dict) -> list[str]:
    """Offload's preads go through the page cache: where the files fit in free memory a row
    reads faster than the disk can, and says so rather than credit the disk."""
    return [f"{row['name']} (world {row['world_size']}) read {row['offload_read_gbps']:.2f} GB/s, above the disk's own "
            f"{disk['read_gbps']:.2f}: its reads came from the page cache (the offload files fit in free memory)"
            for row in rows if row.get("offload_optimizer") == "nvme" and row.get("offload_read_gbps")
            and row["offload_read_gbps"] > disk["read_gbps"]]
