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


def test_a_zero3_run_leaves_no_future_warning_in_the_rank_logs(write_recipe, tmp_path):
    """ZeRO's all-gather and reduce-scatter use torch's current names (all_gather_into_tensor
    and reduce_scatter_tensor warn from torch 2.13 on)."""
    recipe = write_recipe({"train": {"steps": 2}, "launch": {"nproc_per_node": 2}, "parallel": {"zero_stage": 3}})
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    for log in (tmp_path / "run" / "logs").glob("rank*.log"):
        text = log.read_text()
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
