"""An offload store: one rank's tensors in a file on a local disk (ZeRO-Infinity's NVMe tier).

A store is a folder of its own, `<nvme_path>/rank<R>-<pid>/`, holding one data file in which
`allocate` hands out regions at 4 KiB-aligned offsets. Tensors move in and out with
os.preadv / os.pwritev straight on their bytes (any dtype, bf16 included: a ctypes view of
the storage, no copies), on a small pool of I/O threads (`read_async` / `write_async` return
futures; the kernel releases the GIL for the copy, so the threads overlap the step).
`mapped(region)` is a shared mmap view of a region, for DCP to save from and load into in
place: reads and writes through the page cache are coherent with it.

The data file is unlinked as soon as it is open: its blocks go back to the disk however the
process ends, SIGKILL or an out-of-memory kill included, and two runs never see each other's
state. The folder (empty from then on, it only says which process holds space there) is
removed by close(), at interpreter exit, on SIGTERM, and by the worker's failure path
(close_all_stores).

The path is the user's: we only ever create and remove our own subfolder in it.
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrain.errors import UserInputError
from sdtrain.parallel.offload.folder import folder_problem
from sdtrain.parallel.offload.vectored_io import move_all

ALIGNMENT = 4096  # bytes: a page, and what O_DIRECT would need


@dataclass(frozen=True)
class Region:
    """`numel` elements of `dtype` at byte `offset` of the store's file."""
    name: str
    offset: int
    numel: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def check_offload_dir(path: str | os.PathLike) -> Path:
    """The user's nvme_path, checked before anything is written there: an existing, writable
    directory (we make only our own subfolder in it, never the path itself)."""
    problem = folder_problem(path)
    if problem:
        raise UserInputError(problem)
    return Path(path).expanduser()


class OffloadStore:
    def __init__(self, parent: str | os.PathLike, rank: int, io_threads: int = 4):
        """A store in a new folder of its own under `parent`, an existing writable directory
        (check_offload_dir)."""
        self.folder = check_offload_dir(parent) / f"rank{rank}-{os.getpid()}"
        self.folder.mkdir(mode=0o700)  # ours alone; an existing one is not ours: FileExistsError
        data = self.folder / "state.bin"
        self.fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        data.unlink()  # see the module docstring: space returns to the disk however we end
        self.size = 0
        self.regions: dict[str, Region] = {}
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="offload-io")
        self.counters = IoCounters()
        self.closed = False
        _open_stores.add(self)
        _remove_on_exit()

    # --- space ---------------------------------------------------------------------------

    def allocate(self, name: str, numel: int, dtype: torch.dtype) -> Region:
        """A new region of `numel` elements (zeros), at the next 4 KiB boundary."""
        if name in self.regions:
            raise ValueError(f"offload region {name} allocated twice")
        region = Region(name, self.size, numel, dtype)
        self.size += -(-max(region.nbytes, 1) // ALIGNMENT) * ALIGNMENT
        os.ftruncate(self.fd, self.size)  # sparse: blocks are taken as they are written
        self.regions[name] = region
        return region

    # --- moving tensors ------------------------------------------------------------------

    def read(self, region: Region, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """region's elements [start, start + out.numel()) into `out` (contiguous, CPU, its dtype)."""
        at = self._span(region, out, start)
        began = time.perf_counter()
        _move(os.preadv, self.fd, out, at)
        self.counters.add("read", out.numel() * out.element_size(), began, time.perf_counter())
        return out

    def write(self, region: Region, tensor: torch.Tensor, start: int = 0) -> None:
        """`tensor` into region's elements [start, start + tensor.numel())."""
        at = self._span(region, tensor, start)
        began = time.perf_counter()
        _move(os.pwritev, self.fd, tensor, at)
        self.counters.add("write", tensor.numel() * tensor.element_size(), began, time.perf_counter())

    def read_async(self, region: Region, out: torch.Tensor, start: int = 0) -> Future:
        self._span(region, out, start)  # a bad span fails here, in the caller
        return self.pool.submit(self.read, region, out, start)

    def write_async(self, region: Region, tensor: torch.Tensor, start: int = 0) -> Future:
        self._span(region, tensor, start)
        return self.pool.submit(self.write, region, tensor, start)

    def wait(self, future: Future):
        """future's result; the time spent waiting for it is I/O the caller did not overlap."""
        began = time.perf_counter()
        try:
            return future.result()
        finally:
            self.counters.waited += time.perf_counter() - began

    def mapped(self, region: Region) -> torch.Tensor:
        """The region as a tensor over a shared mapping of the file (DCP saves from it and loads
        into it in place). A new mapping each call, unmapped when the tensor goes, so its pages
        do not stay in the resident set after a checkpoint."""
        length = -(-max(region.nbytes, 1) // ALIGNMENT) * ALIGNMENT
        view = mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=region.offset)
        if not region.numel:
            return torch.empty(0, dtype=region.dtype)
        return torch.frombuffer(view, dtype=region.dtype, count=region.numel)

    def _span(self, region: Region, tensor: torch.Tensor, start: int) -> int:
        """The byte offset of element `start` of region, after checking the tensor fits there."""
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != region.dtype:
            raise ValueError(f"offload {region.name}: needs a contiguous CPU {region.dtype} tensor, "
                             f"got {tensor.dtype} on {tensor.device}")
        if start < 0 or start + tensor.numel() > region.numel:
            raise ValueError(f"offload {region.name}: elements [{start}, {start + tensor.numel()}) "
                             f"outside its {region.numel}")
        if self.closed:
            raise RuntimeError("offload store used after close()")
        return region.offset + start * tensor.element_size()

    # --- end -----------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the I/O in flight, release the file's space and remove our folder."""
        if self.closed:
            return
        self.closed = True
        self.pool.shutdown(wait=True)
        os.close(self.fd)
        self._remove_folder()
        _open_stores.discard(self)

    def _remove_folder(self) -> None:
        """Signal-safe enough: no locks, one rmdir of our (empty) folder."""
        try:
            os.rmdir(self.folder)
        except FileNotFoundError:
            pass


class IoCounters:
    """Bytes moved, the time the I/O took (the union of the operations' intervals: threads
    overlap) and the time the step waited on it, since the last take()."""

    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = {"read": 0, "write": 0}
        self.spans: dict[str, list[tuple[float, float]]] = {"read": [], "write": []}
        self.waited = 0.0

    def add(self, kind: str, size: int, began: float, ended: float) -> None:
        with self.lock:
            self.bytes[kind] += size
            self.spans[kind].append((began, ended))

    def take(self) -> dict[str, float]:
        with self.lock:
            taken = {f"{kind}_bytes": self.bytes[kind] for kind in self.bytes}
            taken.update({f"{kind}_s": _union_length(self.spans[kind]) for kind in self.spans})
            taken["wait_s"] = self.waited
            self.bytes = {"read": 0, "write": 0}
            self.spans = {"read": [], "write": []}
            self.waited = 0.0
        return taken


def offload_metrics(taken: dict[str, float], steps: int) -> dict[str, float]:
    """metrics.jsonl's offload numbers from IoCounters.take() over `steps` steps: GiB read and
    written per step, seconds per step the step waited on I/O (exposed, not overlapped), and
    the bandwidth achieved while I/O was running (GB/s, 1e9 bytes)."""
    steps = max(steps, 1)
    return {"offload_read_gib": round(taken["read_bytes"] / steps / 2**30, 6),
            "offload_write_gib": round(taken["write_bytes"] / steps / 2**30, 6),
            "offload_wait_s": round(taken["wait_s"] / steps, 6),
            "offload_read_gbps": round(taken["read_bytes"] / taken["read_s"] / 1e9, 3) if taken["read_s"] else 0.0,
            "offload_write_gbps": round(taken["write_bytes"] / taken["write_s"] / 1e9, 3) if taken["write_s"] else 0.0}


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for began, ended in sorted(spans):
        if ended > end:
            total += ended - max(began, end)
            end = ended
    return total


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _move(call, fd: int, tensor: torch.Tensor, offset: int) -> None:
    """preadv/pwritev straight on the tensor's bytes at `offset` (no copy: a view of its memory)."""
    size = tensor.numel() * tensor.element_size()
    move_all(call, fd, memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B"), offset)


# --- removal at exit ---------------------------------------------------------------------

_open_stores: set[OffloadStore] = set()
_exit_hooks_installed = False


def close_all_stores() -> None:
    """Close every store this process opened (the worker's end, success or failure: it leaves
    with os._exit, which runs no atexit hooks)."""
    for store in list(_open_stores):
        store.close()


def _remove_on_exit() -> None:
    global _exit_hooks_installed
    if _exit_hooks_installed:
        return
    _exit_hooks_installed = True
    atexit.register(close_all_stores)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread: the data file is unlinked anyway
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        # the elastic agent's stop, or PDEATHSIG (join.py): remove our folders, then do what
        # SIGTERM did before (by default: die of it, so the exit status still says SIGTERM)
        for store in list(_open_stores):
            store._remove_folder()
        if callable(previous):
            previous(signum, frame)
            return
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
