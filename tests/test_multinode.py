"""Multi-node launches through real runners: two "nodes", 127.0.0.1 and 127.0.0.2, reached
through a real sshd (ssh, pdsh, mpirun) or a real two-node Slurm on this machine.

Every run is checked against the single-process run of the same recipe, and the fail-fast
figures are measured: a worker on the second node killed mid-run ends every process of the
job on every node within 10 s, the launcher exits 1 and names host, rank, exit and log.

The ssh tests are part of `make test`; pdsh, Slurm and mpirun are `slow` and run with
`make test-multinode`, which first installs the programs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from cluster import HOSTS, program, running_slurm, running_sshd
from conftest import REPO, TINY, losses, merge, metrics, sdtrain
from sdtrain.launch.plan import free_port

pytestmark = pytest.mark.multinode
REL_TOL = 1e-5
SHORT = merge(TINY, {"train": {"steps": 6}})
LONG = merge(TINY, {"train": {"steps": 5000}})


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run every multi-node run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    recipe = write(tmp, SHORT)
    result = sdtrain("launch", recipe, "--nproc-per-node", 1, "--run-dir", tmp / "run")
    assert result.returncode == 0, result.stderr
    return losses(tmp / "run")


def write(folder, recipe) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def hostfile(folder, hosts=HOSTS, slots=2) -> str:
    path = folder / "hostfile"
    path.write_text("# two loopback nodes\n" + "".join(f"{h} slots={slots}\n" for h in hosts))
    return str(path)


def ssh_args(sshd, folder, launcher="ssh", hosts=HOSTS) -> list[str]:
    return ["--hostfile", hostfile(folder, hosts), "--launcher", launcher,
            "--ssh-port", str(sshd.port), "--ssh-options", sshd.options]


def check_matches(reference, run_dir, world_size=4):
    got = losses(run_dir)
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(reference, got), 1):
        assert abs(a - b) <= REL_TOL * abs(a), f"step {step}: 1 process {a} vs {world_size} ranks on 2 nodes {b}"
    for rank in range(world_size):
        assert f"rank {rank}: model" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert (run_dir / "summary.json").read_text().count(f'"world_size": {world_size}') == 1


def job_processes(run_dir):
    """Every process of the job on every node (all nodes are this machine)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if p.pid != os.getpid() and any(str(run_dir) in arg for arg in cmdline):
            found.append(p)
    return found


def start(args, run_dir, prefix=(), env=None):
    return subprocess.Popen([*prefix, sys.executable, "-m", "sdtrain", "launch", *map(str, args), "--run-dir", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200", **(env or {})})


def wait_for_steps(launcher, run_dir, steps=3, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= steps:
            return
        if launcher.poll() is not None:
            pytest.fail(f"the launcher ended before training: {launcher.communicate()}")
        time.sleep(0.2)
    launcher.kill()
    pytest.fail(f"no training step within {timeout} s: {launcher.communicate()}")


def worker(run_dir, rank):
    for p in job_processes(run_dir):
        try:
            if "sdtrain.worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                return p
        except psutil.NoSuchProcess:
            continue
    pytest.fail(f"no worker with rank {rank}")


def kill_rank_and_check_fail_fast(launcher, run_dir, rank=3, host=HOSTS[1]):
    """The fail-fast figures: every process of the job on every node gone within 10 s,
    exit 1, and the root cause named with host, rank, exit and the rank's last log lines."""
    wait_for_steps(launcher, run_dir)
    procs = job_processes(run_dir)
    victim = worker(run_dir, rank)
    killed_at = time.monotonic()
    victim.kill()
    out, err = launcher.communicate(timeout=60)
    exited_after = time.monotonic() - killed_at
    gone, alive = psutil.wait_procs(procs, timeout=max(0.1, 10 - (time.monotonic() - killed_at)))
    all_gone_after = time.monotonic() - killed_at
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.cmdline()[:4]) for p in alive]}"
    assert launcher.returncode == 1, out + err
    assert exited_after < 10 and all_gone_after < 10, f"launcher exit {exited_after:.1f} s, all gone {all_gone_after:.1f} s"
    assert f"root cause: rank {rank} on {host}" in err and "killed by SIGKILL" in err, err
    assert f"pid {victim.pid}" in err and f"rank {rank}: model" in err  # the last lines of its log
    assert not job_processes(run_dir)
    print(f"\nteardown after killing rank {rank} on {host}: launcher exit {exited_after:.2f} s, "
          f"every process gone {all_gone_after:.2f} s")


def run_two_nodes(sshd, reference, tmp_path, launcher):
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write(tmp_path, SHORT), *ssh_args(sshd, tmp_path, launcher), "--run-dir", run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"4 worker(s) on 2 nodes ({launcher})" in result.stdout
    check_matches(reference, run_dir)


def test_ssh_two_nodes_match_one_process(sshd, reference, tmp_path):
    run_two_nodes(sshd, reference, tmp_path, "ssh")


def test_ssh_killed_worker_on_second_node_stops_every_node(sshd, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start([write(tmp_path, LONG), *ssh_args(sshd, tmp_path)], run_dir)
    kill_rank_and_check_fail_fast(launcher, run_dir)


@pytest.mark.slow  # in make test-multinode (make test keeps two ssh launches)
def test_ssh_ctrl_c_reaches_every_node(sshd, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start([write(tmp_path, LONG), *ssh_args(sshd, tmp_path)], run_dir)
    wait_for_steps(launcher, run_dir)
    procs = job_processes(run_dir)
    assert len([p for p in procs if "sdtrain.worker" in " ".join(p.cmdline())]) == 4
    launcher.send_signal(signal.SIGINT)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130, out + err
    assert "interrupted (SIGINT)" in err
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow  # in make test-multinode (make test keeps two ssh launches)
def test_env_file_reaches_the_nodes_and_a_raising_rank_is_named(sshd, tmp_path):
    """.sdtrain_env in the working directory (the nodes cd there too) makes rank 2, on the
    second node, raise at step 3: its traceback comes back as the root cause."""
    (tmp_path / ".sdtrain_env").write_text("# fault drill\nexport SDTRAIN_INJECT_FAULT='2:3'\n")
    result = sdtrain("launch", write(tmp_path, LONG), *ssh_args(sshd, tmp_path), "--run-dir", tmp_path / "run",
                     "--allow-env-file-var", "SDTRAIN_INJECT_FAULT", cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "root cause: rank 2 on 127.0.0.2" in result.stderr and "exit code 1" in result.stderr
    assert "RuntimeError: fault injected by SDTRAIN_INJECT_FAULT=2:3" in result.stderr and "in train_step" in result.stderr
    assert f"injected by SDTRAIN_INJECT_FAULT=2:3 (from {tmp_path / '.sdtrain_env'})" in " ".join(result.stderr.split())
    assert not job_processes(tmp_path / "run")


def assert_same_trajectory(run_dir, reference) -> None:
    """Every logged loss and gradient norm bitwise equal to the uninterrupted run's (DDP's
    buckets are settled before step 1, so a restart averages as the first launch did)."""
    def logged(run):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(run)]

    assert logged(run_dir) == logged(reference)


RESTARTING = merge(TINY, {"train": {"steps": 10}, "checkpoint": {"every": 5, "at_end": False}})


@pytest.mark.slow
def test_ssh_fault_restarts_every_node_on_the_same_trajectory(sshd, tmp_path):
    """2 nodes x 2 workers over ssh, checkpoints every 5: rank 1 raises at step 7 of the
    first attempt; every node is stopped and the fleet started again with --attempt 1 from
    step_5, ending with the losses of the uninterrupted run (4 workers on one node) bitwise."""
    reference = tmp_path / "reference"
    result = sdtrain("launch", write(tmp_path, RESTARTING), "--nproc-per-node", 4, "--run-dir", reference)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write(tmp_path, RESTARTING), *ssh_args(sshd, tmp_path), "--run-dir", run_dir,
                     "--set", "launch.max_restarts=1", env={"SDTRAIN_INJECT_FAULT": "1:7"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    err = " ".join(result.stderr.split())
    assert "restart 1/1 after a failure of attempt 0: rank 1 on 127.0.0.1" in err and "step_5" in err
    assert_same_trajectory(run_dir, reference)
    assert len((run_dir / "restarts.jsonl").read_text().splitlines()) == 1
    assert not job_processes(run_dir)


def test_unreachable_node_is_named_and_the_others_stop(sshd, tmp_path):
    """127.0.0.3 has no sshd: ssh fails (255), and the launcher says so, not 'exit 1'."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = sdtrain("launch", write(tmp_path, LONG), *ssh_args(sshd, tmp_path, hosts=("127.0.0.1", "127.0.0.3")),
                     "--run-dir", run_dir, timeout=60)
    assert result.returncode == 1
    err = " ".join(result.stderr.split())
    assert "node 1 (127.0.0.3) failed before any rank reported: exit code 255" in err
    assert "ssh could not connect" in err and "Connection refused" in err
    assert time.monotonic() - started < 30
    assert not job_processes(run_dir)


def test_preflight_all_hosts_ready(sshd, tmp_path):
    result = sdtrain("preflight", "--hostfile", hostfile(tmp_path), "--ssh-port", sshd.port, "--ssh-options", sshd.options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 2 host(s) ready" in result.stdout and "✗" not in result.stdout
    assert result.stdout.count("✓ reachable") == 2 and "(lo)" in result.stdout


def test_preflight_names_every_failure_with_a_hint(sshd, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = sdtrain("preflight", "--hostfile", hostfile(tmp_path, ("127.0.0.1", "127.0.0.3")), "--master-port", port,
                         "--ssh-port", sshd.port, "--ssh-options", sshd.options)
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert f"✗ {port} in use" in out and "✗ 127.0.0.1: master port: stop what listens there" in out
    assert "✗ 127.0.0.3: ssh: `ssh -F /dev/null" in out and "must work without a password prompt" in out


@pytest.mark.slow  # in make test-multinode (make test keeps two ssh launches)
def test_every_node_its_own_launcher_with_node_rank(reference, tmp_path):
    """The Kubernetes way (launcher/kubernetes.yaml): no runner, each node starts
    `sdtrain launch --hostfile F --node-rank R` itself; they meet at the master port."""
    run_dir, port = tmp_path / "run", free_port()
    args = [write(tmp_path, SHORT), "--hostfile", hostfile(tmp_path), "--master-port", port]
    nodes = [start([*args, "--node-rank", rank], run_dir) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    check_matches(reference, run_dir)


def test_cluster_files_are_valid():
    """launcher/: the batch script parses, the manifest's recipe and hostfile validate."""
    from sdtrain.launch.hostfile import parse_hostfile
    from sdtrain.recipe import validate_recipe

    assert subprocess.run(["bash", "-n", str(REPO / "launcher" / "slurm.sbatch")]).returncode == 0
    docs = list(yaml.safe_load_all((REPO / "launcher" / "kubernetes.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert list(parse_hostfile(config["hostfile"])) == ["sdtrain-0.sdtrain", "sdtrain-1.sdtrain"]
    validate_recipe(yaml.safe_load(config["recipe.yaml"]), source="launcher/kubernetes.yaml")
    job = next(d for d in docs if d["kind"] == "Job")["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0 and job["completions"] == 2
    for name in ("example", "loopback"):
        parse_hostfile((REPO / "hostfiles" / name).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("launcher, package", [("pdsh", "pdsh"), ("mpirun", "openmpi-bin")])
def test_pdsh_and_mpirun_two_nodes(sshd, reference, tmp_path, launcher, package):
    """Both reach 127.0.0.2 through the test sshd: pdsh with -R ssh, OpenMPI's mpirun with its rsh agent."""
    program(launcher, package)
    run_two_nodes(sshd, reference, tmp_path, launcher)
    run_dir = tmp_path / "killed"
    kill_rank_and_check_fail_fast(start([write(tmp_path, LONG), *ssh_args(sshd, tmp_path, launcher)], run_dir), run_dir)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with running_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


@pytest.mark.slow
def test_slurm_allocation_two_nodes(slurm, reference, tmp_path):
    """salloc -N2 around `sdtrain launch --launcher slurm`: no hostfile, the allocation's
    nodes n1 and n2 (both this machine, hence --master-addr)."""
    run_dir = tmp_path / "run"
    args = [write(tmp_path, SHORT), "--launcher", "slurm", "--nproc-per-node", 2, "--master-addr", "127.0.0.1"]
    result = subprocess.run(["salloc", "-N2", sys.executable, "-m", "sdtrain", "launch", *map(str, args), "--run-dir", str(run_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=slurm)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 worker(s) on 2 nodes (slurm)" in result.stdout
    check_matches(reference, run_dir)
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, len(reference) + 1))
    run_dir = tmp_path / "killed"
    args[0] = write(tmp_path, LONG)
    launcher = start(args, run_dir, prefix=("salloc", "-N2"), env=slurm)
    kill_rank_and_check_fail_fast(launcher, run_dir, host="n2")


@pytest.mark.slow
def test_slurm_batch_script(slurm, reference, tmp_path):
    """launcher/slurm.sbatch as a cluster admin would submit it (no GPUs here: overridden)."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        ["sbatch", "--wait", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path / 'job.out'}",
         "launcher/slurm.sbatch", write(tmp_path, SHORT), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=slurm)
    assert result.returncode == 0, result.stdout + result.stderr + (tmp_path / "job.out").read_text()
    assert "4 worker(s) on 2 nodes (slurm)" in (tmp_path / "job.out").read_text()
    check_matches(reference, run_dir)


@pytest.mark.slow
def test_slurm_preemption_requeues_and_resumes(slurm, tmp_path):
    """launcher/slurm.sbatch with checkpoint.on_preempt: `scancel --batch --signal=USR1`
    mid-run -> every worker checkpoints at its step, sdtrain exits 3, the script requeues
    the job, and the requeued job (SLURM_RESTART_COUNT 1) resumes by itself and finishes on
    the uninterrupted run's trajectory."""
    recipe = merge(TINY, {"train": {"steps": 10}, "checkpoint": {"every": 5, "at_end": True, "on_preempt": True}})
    reference = tmp_path / "reference"
    result = sdtrain("launch", write(tmp_path, recipe), "--nproc-per-node", 4, "--run-dir", reference)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
         "launcher/slurm.sbatch", write(tmp_path, recipe), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--run-dir", str(run_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=slurm)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while not (run_dir / "logs" / "rank3.log").exists():  # every worker started; the first step is seconds away
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no job output"
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    while subprocess.run(["squeue", "-h", "-j", job], env=slurm, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline + 300, out.read_text()
        time.sleep(1)
    log = " ".join(out.read_text().split())
    assert "preempted: stopped after step" in log and f"requeueing job {job}" in log, log
    assert (run_dir / "summary.json").exists() and not (run_dir / "preempted.json").exists(), log
    assert_same_trajectory(run_dir, reference)


@pytest.mark.slow
def test_ssh_hang_on_the_second_node_is_diagnosed(sshd, tmp_path):
    """Rank 3, on the second node, hangs at step 3: both nodes' watchdogs take their ranks'
    stacks, and the launcher names rank 3, its line and the collective the others wait in."""
    from test_hang import HANG_TIMEOUT_S, assert_nothing_left, drill_line, hang_began, run_watching

    run_dir = tmp_path / "run"
    recipe = merge(LONG, {"launch": {"hang_timeout_s": HANG_TIMEOUT_S}})
    (tmp_path / ".sdtrain_env").write_text("export SDTRAIN_INJECT_HANG=3:3\n")
    result, procs, ended = run_watching(["launch", write(tmp_path, recipe), *ssh_args(sshd, tmp_path), "--run-dir", run_dir,
                                         "--allow-env-file-var", "SDTRAIN_INJECT_HANG"],
                                        {"OMP_NUM_THREADS": "1"}, cwd=tmp_path, job=lambda: job_processes(run_dir))
    err = result.stderr
    assert result.returncode == 1, result.stdout + err
    assert f"root cause: hang: rank 3 stuck at {drill_line()} while the others wait in all_reduce" in err, err
    assert "likely culprit: rank 3 (node 1" in err and "which ranks 0, 1, 2 wait in" in err
    assert sorted(p.name for p in (run_dir / "hang").glob("node*.json")) == ["node0.json", "node1.json"]
    took = ended - hang_began(run_dir, 3)
    print(f"2 nodes x 2 over ssh: hang -> diagnosis and every process stopped in {took:.1f} s")  # the README's figure
    assert took < HANG_TIMEOUT_S + 15
    assert_nothing_left(procs, run_dir)
    assert not job_processes(run_dir)
