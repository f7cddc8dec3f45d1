"""ZeRO-Infinity's parameter offload (`parallel.zero.offload_params`) at stage 3: the weight
shards live in the rank's offload files, and the run is bitwise the run without offload."""

import shutil

import pytest
import torch

from conftest import TINY, assert_bitwise_same, launch_run, losses, merge, model_state
from sdtrain.train.export import load_model_weights

STEPS = 20
ZERO3 = {"train": {"steps": STEPS}, "parallel": {"zero_stage": 3},
         "checkpoint": {"at_end": True, "every": 10, "keep": 3}}
NVME = "parallel.zero.offload_params=nvme"
# the optimizer's state in the files too, stepped in sub-groups of 4096 elements: several per unit
BOTH = (NVME, "parallel.zero.offload_optimizer=nvme", "parallel.zero.sub_group_mb=0.015625")
OFFLOADED = {"none": (), "params": (NVME,), "both": BOTH}


def launch(tmp, name, world, precision, *overrides):
    return launch_run(tmp, name, world, merge(TINY, ZERO3), f"train.precision={precision}", *overrides)


_references = {}


@pytest.fixture
def reference(tmp_path_factory):
    """The same recipe without offload, one run per (world, precision) for the whole module."""
    def run(world, precision):
        if (world, precision) not in _references:
            tmp = tmp_path_factory.mktemp(f"ref{world}{precision}")
            _references[world, precision] = launch(tmp, "plain", world, precision)
        return _references[world, precision]
    return run


@pytest.mark.parametrize("world, precision, offloaded", [
    (2, "bf16", "params"),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        (1, "fp32", "both"), (2, "fp32", "params"), (1, "bf16", "params"), (1, "fp32", "params"),
        (2, "bf16", "both"), (2, "fp32", "both"), (1, "bf16", "both")]),
])
def test_offloaded_weight_shards_train_bitwise_as_without(reference, tmp_path, world, precision, offloaded):
    # prefetch 1 on 2 blocks: block 1's shard is read while block 0 computes
    run_dir = launch(tmp_path, "nvme", world, precision, *OFFLOADED[offloaded])
    plain = reference(world, precision)
    assert_bitwise_same(plain, run_dir, STEPS)
    # no weight shard stays resident (no parameter is under the persistence threshold here)
    for ours, theirs in zip(model_state(run_dir), model_state(plain)):
        assert ours["params"] == 0 < theirs["params"], (ours, theirs)
        assert ours["grads"] == theirs["grads"]
    assert not any((run_dir / "offload").iterdir()), "offload files left behind"


@pytest.mark.slow
def test_persistent_vectors_stay_resident_and_two_blocks_prefetched(reference, tmp_path):
    plain = launch(tmp_path, "plain", 2, "bf16", "parallel.zero.persistence_threshold=100",
                   "parallel.zero.prefetch_blocks=2")
    run_dir = launch(tmp_path, "nvme", 2, "bf16", NVME, "parallel.zero.persistence_threshold=100",
                     "parallel.zero.prefetch_blocks=2")
    assert_bitwise_same(plain, run_dir, STEPS)
    for ours in model_state(run_dir):
        assert 0 < ours["params"] < 2 * 2000, ours  # the vectors, whole: a few hundred bf16 each


@pytest.mark.slow
@pytest.mark.parametrize("name, world, overrides", [
    # experts: block units of their own, sharded over their edp group, each offloaded
    ("experts", 2, ("model.moe.num_experts=4", "parallel.expert_parallel=2")),
    # a pipeline of ZeRO-3 replicas: each stage gathers its own blocks from its rank's files
    ("pipeline", 4, ("parallel.pipeline.stages=2",)),
    ("recompute", 2, ("train.activation_checkpointing=true",)),
])
def test_params_offload_composes_bitwise(tmp_path, name, world, overrides):
    plain = launch(tmp_path, "plain", world, "bf16", *overrides)
    run_dir = launch(tmp_path, "nvme", world, "bf16", *overrides, *BOTH)
    assert_bitwise_same(plain, run_dir, STEPS)


@pytest.mark.parametrize("saved_with, resumed_with, precision", [
    # (make test keeps test_offload_optimizer's resume across settings)
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("params", "none", "fp32"),  # the master in the files -> in memory
        ("none", "params", "fp32"),  # a checkpoint loaded straight into the files (their mapped views)
        ("params", "none", "bf16"), ("none", "params", "bf16"), ("both", "none", "bf16"),
        ("none", "both", "fp32"), ("params", "both", "bf16")]),
])
def test_resume_across_offload_settings(reference, tmp_path, saved_with, resumed_with, precision):
    plain = reference(2, precision)
    first = launch(tmp_path, "first", 2, precision, *OFFLOADED[saved_with])
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    launch(tmp_path, "resumed", 2, precision, "train.resume=auto", *OFFLOADED[resumed_with])
    got = losses(resumed)
    assert got[10:] == losses(plain)[10:] and len(got) == STEPS
    ours, theirs = load_model_weights(resumed)[0], load_model_weights(plain)[0]
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload_params cpu moves shards off a GPU: needs CUDA")
def test_cpu_offload_keeps_shards_in_host_memory_beside_a_gpu(tmp_path):
    """On a GPU, `cpu` keeps each shard in pinned host memory and copies it to the device for
    its gather: the run is the one without offload (the same kernels on the same device), and
    no weight shard stays in device memory."""
    gpu = {"launch": {"backend": "nccl"}}
    runs = {}
    for name, offload in (("plain", "none"), ("cpu", "cpu")):
        runs[name] = launch_run(tmp_path, name, 1, merge(TINY, merge(ZERO3, gpu)), "train.precision=bf16",
                                f"parallel.zero.offload_params={offload}")
    for a, b in zip(losses(runs["plain"]), losses(runs["cpu"])):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert model_state(runs["cpu"])[0]["params"] == 0 < model_state(runs["plain"])[0]["params"]
