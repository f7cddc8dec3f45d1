"""The offloaded optimizer (offload/optimizer.py) on its own, in one process: bitwise torch's
fused AdamW over the same shards, through a pipeline that never holds more than buffer_count
sub-groups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from sdtrain.parallel.flat_unit import FlatUnit
from sdtrain.parallel.offload.optimizer import OffloadedAdam, sub_group_numel
from sdtrain.parallel.offload.store import OffloadStore
from sdtrain.parallel.zero_optimizer import ResidentAdam
from sdtrain.parallel.zero_units import shard_state

TRAIN = SimpleNamespace(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def units(dtype: torch.dtype) -> list[FlatUnit]:
    """Two units of matrices and vectors (odd sizes: the decay boundary falls mid sub-group)."""
    torch.manual_seed(0)
    made = []
    for i, (rows, cols) in enumerate(((301, 47), (129, 33))):
        params = [(f"u{i}.w", nn.Parameter(torch.randn(rows, cols))), (f"u{i}.b", nn.Parameter(torch.randn(cols)))]
        unit = FlatUnit(f"u{i}", params, 1, 0, torch.float32, torch.device("cpu"))
        shard_state(unit, 1, dtype, torch.device("cpu"))
        made.append(unit)
    return made


@pytest.fixture
def store(tmp_path):
    s = OffloadStore(tmp_path, rank=0)
    yield s
    s.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("buffer_count", [2, 3, 5])
def test_sub_groups_step_bitwise_as_fused_adamw_within_buffer_count(store, dtype, buffer_count):
    separate = dtype != torch.float32
    plain_units, offloaded_units = units(dtype), units(dtype)
    plain = ResidentAdam(TRAIN, separate)
    offloaded = OffloadedAdam(TRAIN, store, 0.004, buffer_count, separate,
                              lambda unit, part, start: unit.full[start : start + part.numel()].copy_(part))
    for optimizer, made in ((plain, plain_units), (offloaded, offloaded_units)):
        for unit in made:
            optimizer.adopt(unit)
        optimizer.ready()
    assert all(u.master is None for u in offloaded_units) == separate  # a separate master leaves memory
    assert len(offloaded.groups) > 2 * buffer_count  # the pipeline really cycles its buffers
    for step in range(3):
        grads = [torch.randn(u.shard_size) for u in plain_units]
        plain.step(grads, lr=1e-3 * (step + 1))
        offloaded.step([g.clone() for g in grads], lr=1e-3 * (step + 1))
        for ours, theirs in zip(offloaded_units, plain_units):
            if separate:  # the new master went into the weights, cast as ZeRO casts it
                theirs.full.copy_(theirs.master)
            assert torch.equal(ours.full, theirs.full)
    assert offloaded.most_in_flight == buffer_count
    assert len(offloaded.buffers) <= buffer_count
    for ours, theirs in zip(offloaded_units, plain_units):
        state, expected = offloaded.unit_state(ours), plain.unit_state(theirs)
        for kind in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[kind], expected[kind]), kind
    assert torch.equal(offloaded.step_count, plain.step_count)


def test_a_checkpoint_load_into_the_mapped_views_reaches_the_weights(store):
    made = units(torch.bfloat16)
    offloaded = OffloadedAdam(TRAIN, store, 0.004, 3, True,
                              lambda unit, part, start: unit.full[start : start + part.numel()].copy_(part))
    for unit in made:
        offloaded.adopt(unit)
    loaded = torch.linspace(-1, 1, made[1].shard_size)
    offloaded.unit_state(made[1])["master"].copy_(loaded)  # as DCP loads in place
    offloaded.masters_to_weights()
    assert torch.equal(made[1].full[: made[1].shard_size], loaded.bfloat16())


def test_sub_groups_are_whole_kibielements():
    assert sub_group_numel(64) == 64 * 2**20 // 4
    assert sub_group_numel(0.001) == 1024  # never below the alignment
    assert sub_group_numel(0.01) % 1024 == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_host_masters_step_as_resident_ones(dtype):
    # offload_optimizer cpu's path (beside a GPU), run on the host here: masters of their own,
    # fp32 included, the same fused kernel, so the same bits; none of it counted as device memory
    resident_units, host_units = units(dtype), units(dtype)
    resident, host = ResidentAdam(TRAIN, dtype != torch.float32), ResidentAdam(TRAIN, dtype != torch.float32,
                                                                            host=True, pin_memory=False)
    for optimizer, made in ((resident, resident_units), (host, host_units)):
        for unit in made:
            optimizer.adopt(unit)
        optimizer.ready()
    assert all(u.master.data_ptr() != u.full.data_ptr() for u in host_units)
    grads = [torch.randn(u.shard_size) for u in resident_units]
    resident.step(grads, 1e-3)
    host.step(grads, 1e-3)
    for ours, theirs in zip(host_units, resident_units):
        assert torch.equal(ours.master, theirs.master)
    assert host.resident() == [] and resident.resident()
