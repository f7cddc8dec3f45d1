"""What a worker leaves on the terminal and in its rank log besides the run's own output:
no deprecation warnings from torch, and one line (not an import traceback) when Ctrl-C
arrives while it or its node agent still imports torch."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, sdtrain


def rank_logs(run_dir) -> dict[str, str]:
    return {log.name: log.read_text() for log in (run_dir / "logs").glob("rank*.log")}


@pytest.mark.parametrize("stage", [3, pytest.param(1, marks=pytest.mark.slow)])
def test_a_zero_run_and_its_resume_leave_no_warning_in_the_rank_logs(write_recipe, tmp_path, stage):
    """ZeRO's all-gather and reduce-scatter use torch's current names (all_gather_into_tensor
    and reduce_scatter_tensor warn from torch 2.13 on), and its checkpoints hand DCP DTensors
    (a ShardedTensor warns, in every rank's log, on every resume)."""
    recipe = write_recipe({"train": {"steps": 2}, "launch": {"nproc_per_node": 2}, "parallel": {"zero_stage": stage},
                           "checkpoint": {"every": 1}})
    run, env = tmp_path / "run", {"OMP_NUM_THREADS": "1"}
    result = sdtrain("launch", recipe, "--run-dir", run, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    first = rank_logs(run)
    assert len(first) == 2
    for text in first.values():
        assert "Warning" not in text, text
    result = sdtrain("launch", recipe, "--run-dir", run, "--set", "train.steps=3", "--set", "train.resume=auto", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, text in rank_logs(run).items():
        assert text.startswith(first[name]) and "resumed from" in text, text  # the log goes on
        assert "Warning" not in text, text


@pytest.mark.parametrize("module, who", [("sdtrain.worker", "rank 3"), ("sdtrain.launch.node", "sdtrain node agent")])
def test_ctrl_c_while_importing_torch_is_one_line_and_130(tmp_path, module, who):
    """Ctrl-C in a terminal reaches the node agent and the workers too, often while they import torch."""
    worker = subprocess.Popen([sys.executable, "-m", module, "--run-dir", str(tmp_path), "--recipe-json", "{}"],
                              cwd=REPO, env={**os.environ, "RANK": "3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    process = psutil.Process(worker.pid)
    deadline = time.monotonic() + 30
    # torch's shared library mapped: the import is under way (it takes seconds more)
    while not any("libtorch" in m.path for m in process.memory_maps()) and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.send_signal(signal.SIGINT)
    out, err = worker.communicate(timeout=30)
    assert worker.returncode == 130, err
    assert err == f"{who}: interrupted while starting\n" and not out, err
