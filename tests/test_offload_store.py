"""The offload store (sdtrain/parallel/offload/store.py): regions in a file, moved with
preadv/pwritev on the tensors' own bytes, shared maps coherent with them, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from sdtrain.errors import UserInputError
from sdtrain.parallel.offload.store import ALIGNMENT, OffloadStore, check_offload_dir


@pytest.fixture
def store(tmp_path):
    s = OffloadStore(tmp_path, rank=3)
    yield s
    s.close()


def test_regions_are_aligned_and_round_trip_every_dtype(store):
    values = {torch.float32: torch.randn(1000), torch.bfloat16: torch.randn(777).bfloat16(),
              torch.float16: torch.randn(5).half()}
    regions = {dtype: store.allocate(str(dtype), t.numel(), dtype) for dtype, t in values.items()}
    assert all(r.offset % ALIGNMENT == 0 for r in regions.values())
    for dtype, t in values.items():
        store.write(regions[dtype], t)
    for dtype, t in values.items():
        out = torch.empty_like(t)
        store.read(regions[dtype], out)
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_partial_reads_and_writes_at_an_element_offset(store):
    region = store.allocate("m", 100, torch.float32)
    store.write(region, torch.arange(100, dtype=torch.float32))
    store.write(region, torch.full((10,), -1.0), start=40)
    out = torch.empty(20)
    store.read(region, out, start=35)
    assert out.tolist() == [35, 36, 37, 38, 39] + [-1.0] * 10 + [50, 51, 52, 53, 54]


def test_async_moves_and_counters(store):
    region = store.allocate("v", 4096, torch.float32)
    store.wait(store.write_async(region, torch.ones(4096)))
    out = torch.zeros(4096)
    store.wait(store.read_async(region, out))
    assert out.sum().item() == 4096
    taken = store.counters.take()
    assert taken["read_bytes"] == taken["write_bytes"] == 4096 * 4
    assert taken["read_s"] > 0 and taken["wait_s"] >= 0
    assert store.counters.take()["read_bytes"] == 0  # take() starts over


def test_a_span_outside_the_region_or_a_wrong_tensor_is_refused(store):
    region = store.allocate("x", 10, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        store.read(region, torch.empty(5), start=6)
    with pytest.raises(ValueError, match="contiguous CPU torch.float32"):
        store.write(region, torch.zeros(4, dtype=torch.bfloat16))


def test_mapped_views_are_coherent_with_reads_and_writes(store):
    a = store.allocate("a", 3000, torch.float32)
    b = store.allocate("b", 10, torch.bfloat16)
    store.write(a, torch.arange(3000, dtype=torch.float32))
    view = store.mapped(a)
    assert torch.equal(view, torch.arange(3000, dtype=torch.float32))
    view[5] = -7.0  # as DCP loads in place
    store.mapped(b).copy_(torch.full((10,), 2.5, dtype=torch.bfloat16))
    out = torch.empty(1)
    store.read(a, out, start=5)
    assert out.item() == -7.0
    back = torch.empty(10, dtype=torch.bfloat16)
    store.read(b, back)
    assert back.float().tolist() == [2.5] * 10


def test_only_our_own_folder_is_made_and_close_removes_it(tmp_path):
    s = OffloadStore(tmp_path, rank=1)
    assert s.folder.parent == tmp_path and s.folder.name == f"rank1-{os.getpid()}"
    assert list(s.folder.iterdir()) == []  # the data file is unlinked from the start
    s.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("problem", ["missing", "file", "read-only"])
def test_a_path_that_is_not_a_writable_folder_is_refused(tmp_path, problem):
    path = tmp_path / "offload"
    if problem == "file":
        path.write_text("")
    elif problem == "read-only":
        path.mkdir(mode=0o500)
        if os.access(path, os.W_OK):
            pytest.skip("running as root: every folder is writable")
    with pytest.raises(UserInputError, match="parallel.zero.nvme_path .* (not a directory|not writable)"):
        check_offload_dir(path)


@pytest.mark.parametrize("ending", ["exit", "raise", "sigterm"])
def test_the_folder_is_gone_however_the_process_ends(tmp_path, ending):
    script = textwrap.dedent(f"""
        import os, signal, sys, time, torch
        from sdtrain.parallel.offload.store import OffloadStore
        s = OffloadStore(sys.argv[1], rank=0)
        s.write(s.allocate("m", 10, torch.float32), torch.ones(10))
        print(s.folder, flush=True)
        if {ending!r} == "raise":
            raise RuntimeError("a failed step")
        if {ending!r} == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().startswith(str(tmp_path / "rank0-"))
    if ending == "sigterm":
        assert done.returncode == -signal.SIGTERM  # still dies of it: the agent sees a SIGTERM'd worker
    assert list(tmp_path.iterdir()) == []
