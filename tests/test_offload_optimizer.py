"""ZeRO-Infinity's optimizer offload (`parallel.zero.offload_optimizer: nvme`): fp32 masters
(where separate) and Adam moments in the rank's offload files, stepped in sub-groups, and
the run is bitwise the run without offload."""

import shutil

import pytest
import torch

from conftest import TINY, assert_bitwise_same, launch_run, losses, merge, metrics, model_state
from sdtrain.model import GPTConfig, count_params

STEPS = 20
BASE = {"train": {"steps": STEPS}, "checkpoint": {"at_end": True, "every": 10, "keep": 3}}
# ~1.5k fp32 elements per sub-group (rounded to 1024): the tiny model's units step in many
PSI = count_params(GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=32, vocab_size=256))
NVME = ("parallel.zero.offload_optimizer=nvme", "parallel.zero.sub_group_mb=0.006")


def launch(tmp, name, world, stage, precision, *overrides):
    return launch_run(tmp, name, world, merge(TINY, BASE), f"parallel.zero_stage={stage}",
                      f"train.precision={precision}", "parallel.zero.reduce_bucket_mb=0.05", *overrides)


_references = {}


@pytest.fixture
def reference(tmp_path_factory):
    """The same recipe without offload, one run per (world, stage, precision) for the module."""
    def run(world, stage, precision):
        key = (world, stage, precision)
        if key not in _references:
            _references[key] = launch(tmp_path_factory.mktemp("ref"), "plain", *key)
        return _references[key]
    return run


@pytest.mark.parametrize("world, stage, precision", [
    (2, 3, "fp32"),  # make test keeps one; the whole matrix is make test-slow's
    *(pytest.param(w, s, p, marks=pytest.mark.slow)
      for w in (1, 2) for s in (1, 2, 3) for p in ("bf16", "fp32") if (w, s, p) != (2, 3, "fp32")),
])
def test_offloaded_optimizer_trains_bitwise_as_in_memory(reference, tmp_path, world, stage, precision):
    run_dir = launch(tmp_path, "nvme", world, stage, precision, *NVME)
    plain = reference(world, stage, precision)
    assert_bitwise_same(plain, run_dir, STEPS)
    for ours, theirs in zip(model_state(run_dir), model_state(plain)):
        assert ours["optimizer"] == 0 < theirs["optimizer"], (ours, theirs)  # nothing of it resident
        assert ours["params"] == theirs["params"] and ours["grads"] == theirs["grads"]
    logged = metrics(run_dir)[-1]
    # bf16: master, m and v read and written each step; fp32: m and v (the master is the weights)
    per_param = 12 if precision == "bf16" else 8
    read, rounding = logged["offload_read_gib"] * 2**30, 2**30 * 1e-6  # (logged to 6 places)
    assert per_param * PSI / world - rounding <= read <= per_param * (PSI / world + 64) + rounding, (read, PSI)
    assert logged["offload_write_gib"] == logged["offload_read_gib"]
    assert logged["offload_wait_s"] >= 0 and logged["offload_read_gbps"] > 0
    assert not any((run_dir / "offload").iterdir()), "offload files left behind"


@pytest.mark.parametrize("name, world, stage, precision, overrides", [
    # fp16: loss-scale trajectory and skipped steps as without offload (a skipped step: no read, no Adam advance)
    pytest.param("fp16", 2, 2, "fp16", ("train.loss_scale.initial_scale_power=24",), marks=pytest.mark.slow),
    # experts: their own units, sharded over their edp group, stepped through the same store
    pytest.param("experts", 2, 1, "bf16", ("model.moe.num_experts=4", "parallel.expert_parallel=2"),
                 marks=pytest.mark.slow),
    # with stage 3's weight shards offloaded too: under fp32 they are the masters, stepped in
    # the params' own regions (one copy on disk); under bf16 each sub-group's cast goes there
    ("params-fp32", 2, 3, "fp32", ("parallel.zero.offload_params=nvme",)),
    pytest.param("params-bf16", 2, 3, "bf16", ("parallel.zero.offload_params=nvme",), marks=pytest.mark.slow),
    # a pipeline: each stage's ZeRO over its replicas, a store per rank
    pytest.param("pipeline", 2, 1, "bf16", ("parallel.pipeline.stages=2",), marks=pytest.mark.slow),
    pytest.param("pipeline-zero3-fp32", 4, 3, "fp32", ("parallel.pipeline.stages=2",), marks=pytest.mark.slow),
])
def test_offload_composes_bitwise(tmp_path, name, world, stage, precision, overrides):
    plain = launch(tmp_path, "plain", world, stage, precision, *overrides)
    run_dir = launch(tmp_path, "nvme", world, stage, precision, *overrides, *NVME)
    assert_bitwise_same(plain, run_dir, STEPS)
    if precision == "fp16":
        ours, theirs = metrics(run_dir), metrics(plain)
        assert [m["loss_scale"] for m in ours] == [m["loss_scale"] for m in theirs]
        assert ours[-1]["overflow_steps"] == theirs[-1]["overflow_steps"] > 0  # 2^24 overflows at first


@pytest.mark.parametrize("saved_with, resumed_with, precision", [
    (NVME, (), "bf16"),  # masters and moments from the files' mapped views -> in memory
    pytest.param((), NVME, "bf16", marks=pytest.mark.slow),  # a checkpoint loaded straight into the files
    pytest.param(NVME, (), "fp32", marks=pytest.mark.slow),
    pytest.param((), NVME, "fp32", marks=pytest.mark.slow),
])
def test_resume_across_offload_settings(reference, tmp_path, saved_with, resumed_with, precision):
    plain = reference(2, 2, precision)
    first = launch(tmp_path, "first", 2, 2, precision, *saved_with)
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    launch(tmp_path, "resumed", 2, 2, precision, "train.resume=auto", *resumed_with)
    assert_bitwise_same(plain, resumed, STEPS)


def test_a_failed_run_leaves_no_offload_files(tmp_path, write_recipe):
    from conftest import sdtrain

    nvme = tmp_path / "nvme"
    nvme.mkdir()
    recipe = write_recipe({"parallel": {"zero_stage": 2}})
    failed = sdtrain("launch", recipe, "--nproc-per-node", 2, "--run-dir", tmp_path / "run",
                     "--set", NVME[0], "--set", f"parallel.zero.nvme_path={nvme}",
                     env={"SDTRAIN_INJECT_FAULT": "1:3"}, timeout=600)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    assert "fault injected" in failed.stdout + failed.stderr
    assert list(nvme.iterdir()) == []  # rank 1 raised, rank 0 was stopped: neither left its folder


def test_an_nvme_path_that_is_no_folder_is_refused_before_launch_and_not_made(tmp_path, write_recipe):
    # refused before launch, in the words the workers' store would use (offload/store.check_offload_dir)
    from conftest import sdtrain

    recipe = write_recipe({"parallel": {"zero_stage": 1}})
    refused = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", "--set", NVME[0],
                      "--set", f"parallel.zero.nvme_path={tmp_path / 'missing'}", timeout=600)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 2 and "parallel.zero.nvme_path" in said and "is not a directory" in said, said[-3000:]
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload_optimizer cpu acts only beside a GPU")
@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_offload_beside_a_gpu_trains_as_in_device_memory(tmp_path, offload):
    # the step runs on the host (torch's fused CPU AdamW), the in-memory one on the GPU (its
    # fused CUDA AdamW): the same update to within the kernels' last bits
    gpu = ("launch.backend=nccl",)
    plain = launch(tmp_path, "plain", 1, 2, "bf16", *gpu)
    run_dir = launch(tmp_path, offload, 1, 2, "bf16", *gpu, f"parallel.zero.offload_optimizer={offload}",
                     "parallel.zero.sub_group_mb=0.006")
    for ours, theirs in zip(losses(run_dir), losses(plain)):
        assert abs(ours - theirs) <= 1e-2 * abs(theirs)
    state = model_state(run_dir)[0]
    assert state["optimizer"] == 0 < model_state(plain)[0]["optimizer"]  # none of it in device memory
