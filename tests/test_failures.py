"""A rank that dies takes the job down fast, is named as the root cause, and leaves no
process behind; Ctrl-C stops everything too."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, sdtrain

LONG = {"train": {"steps": 5000}, "launch": {"nproc_per_node": 2}}


def start_launch(recipe, run_dir, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "sdtrain", "launch", str(recipe), "--run-dir", str(run_dir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def wait_for_training(launcher, run_dir, steps=3, timeout=90):
    """Return every process of the job once it has logged `steps` steps."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return psutil.Process(launcher.pid).children(recursive=True)
        assert launcher.poll() is None, launcher.communicate()
        time.sleep(0.2)
    pytest.fail("training never started")


def worker_with_rank(procs, rank):
    for p in procs:
        try:
            if p.environ().get("RANK") == str(rank) and "sdtrain.worker" in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    pytest.fail(f"no worker with RANK={rank} among {procs}")


def assert_all_gone(procs):
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def test_killed_worker_stops_the_job_with_root_cause(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    procs = wait_for_training(launcher, run_dir)
    victim = worker_with_rank(procs, 1)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    out, err = launcher.communicate(timeout=60)
    elapsed = time.monotonic() - killed_at
    assert launcher.returncode == 1, out + err
    assert elapsed < 10, f"teardown took {elapsed:.1f} s"
    assert "root cause: rank 1" in err and "killed by SIGKILL" in err
    assert f"pid {victim.pid}" in err
    assert_all_gone(procs)


def test_raising_worker_reports_its_traceback(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe({"train": {"steps": 30}, "launch": {"nproc_per_node": 2}})
    started = time.monotonic()
    result = sdtrain("launch", recipe, "--run-dir", run_dir, env={"SDTRAIN_INJECT_FAULT": "0:4"}, timeout=120)
    assert result.returncode == 1
    assert "root cause: rank 0" in result.stderr and "exit code 1" in result.stderr
    assert "RuntimeError: fault injected by SDTRAIN_INJECT_FAULT=0:4" in result.stderr
    assert "in train_step" in result.stderr  # the traceback, not just the message
    assert "also stopped: rank 1" in result.stderr
    assert time.monotonic() - started < 60
    assert (run_dir / "logs" / "rank0.log").read_text().count("fault injected") >= 1


def test_ctrl_c_stops_every_process(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    procs = wait_for_training(launcher, run_dir)
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130, out + err
    assert "interrupted (SIGINT)" in err
    assert_all_gone(procs)


def test_killed_launcher_takes_its_node_agent_down(write_recipe, tmp_path):
    """Even SIGKILL to the launcher, which can run no cleanup, leaves nothing behind:
    the node agent gets SIGTERM from the kernel (PR_SET_PDEATHSIG) and stops its workers."""
    run_dir = tmp_path / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    procs = wait_for_training(launcher, run_dir)
    launcher.kill()
    launcher.communicate(timeout=10)
    gone, alive = psutil.wait_procs(procs, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
