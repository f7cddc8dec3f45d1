"""`sdtrain import-deepspeed` carries ZeRO-Offload / ZeRO-Infinity settings (issue 22) from
ds_config files shaped as DeepSpeed's docs write them (no DeepSpeed needed)."""

from __future__ import annotations

import json

import pytest

from conftest import sdtrain
from sdtrain.recipe import load_recipe

# DeepSpeed's ZeRO-Infinity example (docs: "ZeRO-Infinity", config-json's offload sections).
INFINITY = {
    "train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 4,
                              "fast_init": False},
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "pin_memory": True, "buffer_count": 5,
                          "buffer_size": 1e8, "max_in_cpu": 1e9},
        "sub_group_size": 1e9,
        "overlap_comm": True,
    },
    "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True},
}


def run_import(tmp_path, config):
    source, out = tmp_path / "ds_config.json", tmp_path / "recipe.yaml"
    source.write_text(json.dumps(config))
    out.unlink(missing_ok=True)
    return sdtrain("import-deepspeed", source, "--out", out), out


def zero_with(stage: int, **keys) -> dict:
    return {**INFINITY, "zero_optimization": {"stage": stage, **keys}}


def test_zero_infinity_nvme_carries_device_path_buffers_and_sub_groups(tmp_path):
    result, out = run_import(tmp_path, INFINITY)
    assert result.returncode == 0, result.stderr
    zero = load_recipe(out).parallel.zero
    assert (zero.offload_optimizer, zero.offload_params, zero.nvme_path) == ("nvme", "nvme", "/local_nvme")
    assert zero.pin_memory is True and zero.buffer_count == 4
    assert zero.sub_group_mb == pytest.approx(1e9 * 4 / 2**20, abs=1e-4)  # elements of fp32 master, in MB
    lines = result.stdout
    assert "sdtrain does not offload" not in lines
    # what sdtrain does its own way is listed with its reason, never silently dropped
    for key in ("offload_optimizer.fast_init", "offload_param.buffer_count", "offload_param.buffer_size",
                "offload_param.max_in_cpu"):
        assert f"zero_optimization.{key}" in lines
    aio = next(line for line in lines.splitlines() if line.strip().startswith("- aio"))
    assert "pread/pwrite" in aio and "!" not in aio  # acknowledged in one line; not a change of the numbers
    launched = sdtrain("launch", out, "--nproc-per-node", 2, "--dry-run", "--json", "--run-dir", tmp_path / "run",
                       "--set", f"parallel.zero.nvme_path={tmp_path}", env={"SDTRAIN_MEMORY_LIMIT": "64GiB"})
    assert launched.returncode == 0, launched.stderr
    assert json.loads(launched.stdout)["memory"]["disk_bytes_per_rank"] > 0


def test_cpu_offload_carried_and_said_to_be_none_without_a_gpu(tmp_path):
    config = zero_with(2, offload_optimizer={"device": "cpu", "pin_memory": False})
    result, out = run_import(tmp_path, config)
    assert result.returncode == 0, result.stderr
    zero = load_recipe(out).parallel.zero
    assert (zero.offload_optimizer, zero.offload_params, zero.pin_memory) == ("cpu", "none", False)
    assert "without a GPU sdtrain runs cpu as none" in result.stdout


def test_deprecated_booleans(tmp_path):
    result, out = run_import(tmp_path, zero_with(3, cpu_offload=True, cpu_offload_params=True,
                                                 cpu_offload_use_pin_memory=False))
    assert result.returncode == 0, result.stderr
    zero = load_recipe(out).parallel.zero
    assert (zero.offload_optimizer, zero.offload_params, zero.pin_memory) == ("cpu", "cpu", False)
    result, out = run_import(tmp_path, zero_with(2, cpu_offload=False))
    assert result.returncode == 0 and load_recipe(out).parallel.zero.offload_optimizer == "none"


def test_device_none_is_no_offload(tmp_path):
    result, out = run_import(tmp_path, zero_with(3, offload_optimizer={"device": "none", "nvme_path": "/x"},
                                                 offload_param={"device": "none"}))
    assert result.returncode == 0, result.stderr
    zero = load_recipe(out).parallel.zero
    assert (zero.offload_optimizer, zero.offload_params, zero.nvme_path) == ("none", "none", None)


def test_buffer_count_outside_sdtrain_s_range_is_kept_in_it_and_said(tmp_path):
    result, out = run_import(tmp_path, zero_with(2, offload_optimizer={"device": "nvme", "nvme_path": "/n", "buffer_count": 32}))
    assert result.returncode == 0, result.stderr
    assert load_recipe(out).parallel.zero.buffer_count == 16 and "32 is outside sdtrain's 2..16" in result.stdout


@pytest.mark.parametrize("zero, expected", [
    ({"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/n"}},
     "zero_optimization.offload_param.device nvme offloads stage 3's weight shards, and this config runs stage 2"),
    ({"stage": 1, "cpu_offload_params": True}, "zero_optimization.cpu_offload_params cpu offloads stage 3's weight shards"),
    ({"stage": 3, "offload_optimizer": {"device": "gpu"}}, "offload_optimizer.device must be one of none, cpu, nvme"),
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": 7}}, "nvme_path must be a folder name"),
    ({"stage": 3, "sub_group_size": "lots"}, "zero_optimization.sub_group_size must be a number"),
])
def test_refused_with_the_reason(tmp_path, zero, expected):
    result, out = run_import(tmp_path, {**INFINITY, "zero_optimization": zero})
    assert result.returncode == 2 and not out.exists()
    assert expected in " ".join(result.stderr.split()), result.stderr
