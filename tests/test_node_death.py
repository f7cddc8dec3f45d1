"""A node that dies mid-run (its agent or its ssh connection killed) is the root cause; the
ranks of the other nodes, which fail a moment later with "Connection reset by peer", are
listed as stopped with it."""

from __future__ import annotations

import io
import json
import signal
import sys
import textwrap

import pytest
from rich.console import Console

from sdtrain.launch.failures import REPORT_PREFIX
from sdtrain.launch.supervise import Supervisor
from test_multinode import sshd  # noqa: F401  (the fixture: a real sshd on loopback)

RESET = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.2]:41234: Connection reset by peer"


def rank_report(error: str, rank: int = 0) -> dict:
    return {"node_rank": rank, "root_cause": rank, "failures": [
        {"rank": rank, "local_rank": 0, "host": "ab"[rank], "node_rank": rank, "pid": 7, "exitcode": 1,
         "exit": "exit code 1", "timestamp": 2.0, "error": error, "traceback": f"Traceback ...\n{error}", "log_tail": ""}]}


def rank0_report(error: str) -> dict:
    return rank_report(error, 0)


def two_node_job(tmp_path, write_recipe, metrics=True):
    from sdtrain.launch.job import plan_job
    from sdtrain.launch.placement import LaunchRequest

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    run_dir = tmp_path / "run"
    job = plan_job(str(write_recipe()), [], None, str(run_dir), LaunchRequest(hostfile=str(hostfile)))
    run_dir.mkdir()
    if metrics:
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    return job


def stand_in(script: str) -> list[str]:
    """A real process in place of a node's runner (ssh + agent): the launcher reads its stderr."""
    return [sys.executable, "-c", textwrap.dedent(script)]


@pytest.mark.parametrize("error, dead_is_cause", [(RESET, True), ("ValueError: a batch of the wrong shape", False)])
def test_a_dead_node_is_the_root_cause_and_the_reset_ranks_stop_with_it(tmp_path, write_recipe, error, dead_is_cause):
    job = two_node_job(tmp_path, write_recipe)
    node0 = f"""
        import sys, time
        time.sleep(0.5)  # its rank notices the dead peer at its next collective
        print({REPORT_PREFIX + json.dumps(rank0_report(error))!r}, file=sys.stderr, flush=True)
        sys.exit(1)
    """
    node1 = """
        import os, signal, sys
        print("rank 1: step 3", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # the node's agent (or its connection) killed
    """
    outcome = Supervisor([stand_in(node0), stand_in(node1)], labels=["node 0", "node 1"], nodes=job.plan.nodes,
                         run_dir=job.run_dir).run()
    assert outcome.exit_codes == [1, -signal.SIGKILL]
    from sdtrain.launch.report import print_failure

    out = io.StringIO()
    print_failure(Console(file=out, width=250), job, outcome)
    printed = out.getvalue()
    died = "node 1 (127.0.0.2) died at step 3 (its agent or connection was killed, killed by SIGKILL)"
    if dead_is_cause:
        assert f"root cause: {died}" in printed, printed
        assert f"also stopped: rank 0 on 127.0.0.1 exit code 1: {RESET}" in " ".join(printed.split()), printed
        assert "root cause: rank" not in printed
    else:  # a rank that failed of something else stays the root cause; the dead node is named beside it
        assert "root cause: rank 0 on 127.0.0.1" in printed and died in printed, printed
        assert f"root cause: {died}" not in printed
    assert "ssh could not connect" not in printed  # 255's hint is for a node that never started


def test_node_0_dead_without_a_shared_run_directory_is_still_the_root_cause(tmp_path, write_recipe):
    """The nodes do not share the run directory and node 0, which holds rank 0 and writes
    metrics.jsonl, is killed (its ssh reports 137): no metrics ever reach the launcher.
    Node 1's ranks fail of the reset; its agent sends its files back, its ranks' heartbeats
    among them, and those say the run was at step 5: node 0 died, it did not fail to start."""
    from sdtrain.launch.collect import encode_files

    job = two_node_job(tmp_path, write_recipe, metrics=False)
    node1_dir = tmp_path / "node1"
    (node1_dir / "progress").mkdir(parents=True)
    (node1_dir / "progress" / "rank1.json").write_text(json.dumps({"rank": 1, "step": 5, "first_step": 1}))
    (node1_dir / "logs").mkdir()
    (node1_dir / "logs" / "rank1.log").write_text("rank 1: step 5\n")
    sent = list(encode_files(node1_dir, [node1_dir / "logs" / "rank1.log", node1_dir / "progress" / "rank1.json"]))
    node0 = """
        import sys
        print("rank 0: step 5", file=sys.stderr, flush=True)
        sys.exit(137)  # how ssh reports a remote agent killed by SIGKILL
    """
    node1 = f"""
        import sys, time
        time.sleep(0.5)
        print({REPORT_PREFIX + json.dumps(rank_report(RESET, 1))!r}, file=sys.stderr, flush=True)
        for line in {sent!r}:
            print(line, file=sys.stderr, flush=True)
        sys.exit(1)
    """
    outcome = Supervisor([stand_in(node0), stand_in(node1)], labels=["node 0", "node 1"], nodes=job.plan.nodes,
                         run_dir=job.run_dir).run()
    assert outcome.exit_codes == [137, 1] and not (job.run_dir / "metrics.jsonl").exists()
    from sdtrain.launch.report import print_failure

    out = io.StringIO()
    print_failure(Console(file=out, width=250), job, outcome)
    printed = " ".join(out.getvalue().split())
    assert "root cause: node 0 (127.0.0.1) died at step 5 (its agent or connection was killed, exit code 137)" in printed, printed
    assert f"also stopped: rank 1 on 127.0.0.2 exit code 1: {RESET}" in printed, printed
    assert "failed before any rank reported" not in printed


def test_a_heartbeat_is_evidence_and_a_forged_one_is_not(tmp_path):
    from sdtrain.launch.node_death import last_step, node_died
    from sdtrain.launch.plan import Node

    node = Node("hosta", (0,), 0)
    assert node_died(node, 137, tmp_path) is None  # nothing says the run was under way: it may never have started
    (tmp_path / "progress").mkdir()
    (tmp_path / "progress" / "rank3.nccl.json").write_text(json.dumps({"step": 99}))  # not a heartbeat
    (tmp_path / "progress" / "rank2.json").write_text('{"step": true}')
    (tmp_path / "progress" / "rank4.json").write_text("{" * 100_000)
    assert last_step(tmp_path) is None
    (tmp_path / "progress" / "rank1.json").write_text(json.dumps({"step": 4}))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")  # logged every few steps: behind
    assert node_died(node, 137, tmp_path).startswith("node 0 (hosta) died at step 4 ")


def test_a_real_node_without_the_shared_run_directory_sends_its_heartbeats(tmp_path):
    """A real node agent and worker in a directory the launcher never prepared: the files it
    sends back at its end carry its rank's heartbeat, which says the step it reached."""
    import yaml

    from conftest import TINY, merge
    from sdtrain.launch.collect import FileReceiver, senders
    from sdtrain.launch.node_death import last_begun_step
    from sdtrain.launch.plan import Node
    from test_remote_agent import agent

    result = agent(tmp_path, yaml.safe_load(yaml.safe_dump(merge(TINY, {"train": {"steps": 200}, "log": {"every": 50}}))), nnodes=1)
    assert result.returncode == 0, result.stderr
    receiver, (sender,) = FileReceiver(tmp_path / "launcher-run"), senders([Node("hosta", (0,), 0)])
    for line in result.stderr.splitlines():
        receiver.feed(line, sender)
    assert receiver.notes == []
    assert 1 <= last_begun_step(tmp_path / "launcher-run") <= 200  # rewritten every half second: it lags a little


@pytest.mark.multinode
@pytest.mark.parametrize("victim", ["agent", pytest.param("ssh", marks=pytest.mark.slow)])
def test_a_node_killed_mid_run_over_ssh_is_the_root_cause(sshd, tmp_path, victim):
    """The reproduction over a real sshd: node 1's agent (on 127.0.0.2), or the launcher's ssh
    connection to it, killed once training runs."""
    import psutil

    from test_multinode import LONG, job_processes, ssh_args, start, wait_for_steps, write

    run_dir = tmp_path / "run"
    launcher = start([write(tmp_path, LONG), *ssh_args(sshd, tmp_path)], run_dir)
    try:
        wait_for_steps(launcher, run_dir)
        if victim == "agent":
            targets = [p for p in job_processes(run_dir) if "sdtrain.launch.node" in " ".join(p.cmdline())
                       and "--node-rank 1 " in " ".join(p.cmdline()) and p.cmdline()[0] != "ssh"]
        else:
            targets = [p for p in psutil.Process(launcher.pid).children()
                       if p.cmdline()[:1] == ["ssh"] and "127.0.0.2" in p.cmdline()]
        assert len(targets) == 1, targets
        targets[0].kill()
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = " ".join(err.split())
    assert launcher.returncode == 1, err[-3000:]
    assert "root cause: node 1 (127.0.0.2) died at step" in text, err[-3000:]
    assert "root cause: rank" not in text and "also stopped: rank 0 on 127.0.0.1" in text, err[-3000:]
    gone, alive = psutil.wait_procs(job_processes(run_dir), timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
