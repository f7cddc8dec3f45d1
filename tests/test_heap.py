"""HeapTrimmer (sdtrain/train/heap.py) on this process's real heap: holes left by freed
tensors are handed back once the resident set has grown past the margin, and memory still
in use is not trimmed for again and again."""

import psutil
import pytest
import torch

from sdtrain.train.heap import HeapTrimmer, _malloc_trim

pytestmark = pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")

MiB = 2**20


def resident() -> int:
    return psutil.Process().memory_info().rss


def holes(count: int = 160) -> list[torch.Tensor]:
    """Fill `count` MiB of the heap with 1 MiB tensors and free every other one: the kept
    ones pin the heap, so the freed half stays resident in holes unless trimmed. (A freed
    large block first raises glibc's mmap threshold, as a training step's buffers do, so
    that these come from the heap rather than from mmap.)"""
    torch.empty(24 * MiB, dtype=torch.uint8).fill_(1)  # made and freed at once
    blocks = [torch.ones(MiB // 4) for _ in range(count)]
    return blocks[1::2]


def test_freed_holes_go_back_once_the_heap_grew_past_the_margin():
    _malloc_trim()(0)  # holes earlier tests left are not resident: refilling them grows the set too
    trimmer = HeapTrimmer(torch.device("cpu"), margin=0.05)
    trimmer.after_step()  # the first step sets the baseline
    kept = holes()
    grown = resident()
    assert grown > trimmer.baseline * 1.05, "the holes did not grow the resident set enough for this test"
    trimmer.after_step()
    assert trimmer.trims == 1
    assert grown - resident() > 40 * MiB  # most of the 80 MiB of holes handed back
    assert len(kept) == 80


def test_memory_in_use_is_trimmed_for_once_then_becomes_the_baseline():
    _malloc_trim()(0)
    trimmer = HeapTrimmer(torch.device("cpu"), margin=0.05)
    trimmer.after_step()
    in_use = [torch.ones(MiB // 4) for _ in range(160)]  # no holes: all of it held
    trimmer.after_step()
    trimmer.after_step()
    assert trimmer.trims == 1
    assert trimmer.baseline >= resident() * 0.95
    assert len(in_use) == 160


def test_nothing_to_do_off_the_cpu():
    trimmer = HeapTrimmer(torch.device("meta"))
    trimmer.after_step()
    trimmer.after_step()
    assert trimmer.trim is None and trimmer.baseline is None and trimmer.trims == 0


# Three block-sized buffers made, filled and freed, over and over, as ZeRO-3 gathers and frees
# a few blocks' weights at a time: the most page faults of a round over the last five of ten
# (the first few grow the heap to its size), in a fresh process.
ROUNDS = r'''
import resource, sys, torch
from sdtrain.train.heap import keep_freed_buffers_in_heap
if sys.argv[1] == "keep":
    assert keep_freed_buffers_in_heap()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.empty(3 * 2**20).fill_(1.0) for _ in range(3)]  # 12 MiB each
    del buffers
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[5:]))
'''


def faults_per_round(setting: str) -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ROUNDS, setting], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_freed_buffers_are_reused_without_faulting_pages_in_again():
    """(glibc's own settings usually return the 36 MiB freed at once to the system every round,
    and fault 6,000-9,000 pages back in the next: most runs, not all, so only the kept heap
    is asserted on.)"""
    pages_per_buffer = 12 * MiB // 4096
    assert faults_per_round("keep") < pages_per_buffer // 10
