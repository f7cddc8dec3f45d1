"""Freed heap memory handed back to the system on CPU, when a run's resident set creeps.

A CPU worker's tensors live in glibc's heap. Each step allocates and frees buffers of many
sizes (ZeRO-3's gathered weights and whole-gradient buckets, one unit after another), and
the holes they leave are kept, resident, and not always reusable. Measured on the 2-core VM
(tests/test_memory_plan.py's MoE recipe, ZeRO-3, EP 2, 2 ranks): the resident set grew about
7 MB a step without end, 902 to 1,289 MiB over 55 steps, while the tensors Python held stayed
at 145 MiB; ZeRO-0 on the same model stayed flat. Fixing glibc's mmap threshold stops the
growth but costs 15-28% of throughput on bench-20m (every large buffer faults its pages in
anew); `malloc_trim` after every step costs 1-16%. So this trims only when the resident set
has grown past the first step's by a margin: a run that does not fragment never pays, one
that does pays a trim every few steps and keeps its peak where the first step put it.
"""

from __future__ import annotations

import ctypes

import psutil
import torch

GROWTH_MARGIN = 0.10  # trim once the resident set is this much above the first step's


# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): larger
# requests are mapped whatever is asked
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD = 1 << 30  # the heap's free top is returned past this; the trimmer below does the rest


def keep_freed_buffers_in_heap() -> bool:
    """Serve buffers up to 32 MiB from the heap and keep them there once freed, so the next
    buffer of the size (the next block's gathered weights, the next bucket) reuses their pages
    instead of faulting fresh ones in from the kernel. glibc's default maps such a buffer
    afresh until its adaptive threshold has seen one freed, and returns the heap's top to the
    system whenever twice that is free at once, which ZeRO-3's gather-and-free of each block
    does every step. Measured on bench-20m, 2 ranks (tests/measure_zero_speed.py, steps
    paired): ZeRO-3's page faults 4,876 a step -> 0, its step 1.089x DDP's -> 1.059x.
    (Fixing the threshold low instead, every buffer mapped, is the 15-28% loss above.)
    Resident memory that creeps past the first step's is still handed back, by HeapTrimmer.
    True where glibc took both settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another system)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


class HeapTrimmer:
    def __init__(self, device: torch.device, margin: float = GROWTH_MARGIN):
        self.trim = _malloc_trim() if device.type == "cpu" else None
        self.process = psutil.Process() if self.trim is not None else None  # read after every step
        self.margin = margin
        self.baseline: int | None = None  # resident bytes after the first step
        self.trims = 0

    def after_step(self) -> None:
        if self.trim is None:
            return
        resident = self.process.memory_info().rss
        if self.baseline is None:
            self.baseline = resident
            return
        if resident <= self.baseline * (1 + self.margin):
            return
        self.trim(0)
        self.trims += 1
        resident = self.process.memory_info().rss
        if resident > self.baseline * (1 + self.margin):
            # The memory is in use, not free: this is the run's size now. Without this,
            # a run that simply holds more than after its first step would trim every step.
            self.baseline = resident
