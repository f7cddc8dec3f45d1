"""Measure multi-node launch: time to the first training step for 2 nodes x 2 workers over
ssh, against the same job started by hand with torchrun on each node; and the teardown
time after a worker on the second node is killed. Alternating rounds, medians.

    .venv/bin/python tests/measure_multinode.py [--rounds 3]

Uses the test sshd (tests/cluster.py), so it needs openssh-server. Not a test: it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cluster import HOSTS, running_sshd  # noqa: E402
from conftest import REPO, TINY, merge  # noqa: E402

from sdtrain.launch.plan import free_port  # noqa: E402

RECIPE = merge(TINY, {"train": {"steps": 5000}})


def first_step_s(procs, run_dir: Path, started: float) -> float:
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"ended before the first step: {[p.communicate() for p in procs]}")
        time.sleep(0.02)
    return time.monotonic() - started


def stop(procs, run_dir: Path) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)
    leftovers = [q for q in psutil.process_iter(["cmdline"]) if any(str(run_dir) in a for a in q.info["cmdline"] or [])]
    psutil.wait_procs(leftovers, timeout=15)


def sdtrain_ssh(tmp: Path, sshd, recipe: Path, hostfile: Path, run_dir: Path) -> list[subprocess.Popen]:
    argv = [sys.executable, "-m", "sdtrain", "launch", str(recipe), "--hostfile", str(hostfile), "--ssh-port", str(sshd.port),
            "--ssh-options", sshd.options, "--run-dir", str(run_dir)]
    return [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


def torchrun_by_hand(tmp: Path, sshd, recipe: Path, hostfile: Path, run_dir: Path) -> list[subprocess.Popen]:
    """What a user types on each node: torchrun with the node rank, over ssh, in parallel."""
    plan = json.loads(subprocess.run([sys.executable, "-m", "sdtrain", "launch", str(recipe), "--hostfile", str(hostfile),
                                      "--dry-run", "--json"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    run_dir.mkdir(parents=True)
    port = free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = []
    for rank, host in enumerate(HOSTS):
        worker = [torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "2", "--master-addr", HOSTS[0],
                  "--master-port", str(port), "-m", "sdtrain.worker", "--run-dir", str(run_dir),
                  "--recipe-json", json.dumps(plan["recipe"]), "--resume-from", ""]
        remote = f"cd {shlex.quote(str(REPO))} && exec {shlex.join(worker)}"
        procs.append(subprocess.Popen(["ssh", *sshd.options.split(), "-p", str(sshd.port), host, remote],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def teardown_s(sshd, recipe: Path, hostfile: Path, run_dir: Path) -> float:
    procs = sdtrain_ssh(None, sshd, recipe, hostfile, run_dir)
    first_step_s(procs, run_dir, time.monotonic())
    time.sleep(1)
    job = [q for q in psutil.process_iter(["cmdline"]) if any(str(run_dir) in a for a in q.info["cmdline"] or [])]
    victim = next(q for q in job if "sdtrain.worker" in " ".join(q.cmdline()) and q.environ().get("RANK") == "3")
    killed = time.monotonic()
    victim.kill()
    psutil.wait_procs(job, timeout=30)
    took = time.monotonic() - killed
    procs[0].wait(timeout=30)
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        recipe, hostfile = tmp / "recipe.yaml", tmp / "hostfile"
        recipe.write_text(yaml.safe_dump(RECIPE))
        hostfile.write_text("".join(f"{h} slots=2\n" for h in HOSTS))
        with running_sshd(tmp / "sshd") as sshd:
            times = {"sdtrain launch (ssh)": [], "torchrun per node (ssh)": []}
            for round_ in range(args.rounds):
                for name, start in (("sdtrain launch (ssh)", sdtrain_ssh), ("torchrun per node (ssh)", torchrun_by_hand)):
                    run_dir = tmp / f"{name.split()[0]}-{round_}"
                    started = time.monotonic()
                    procs = start(tmp, sshd, recipe, hostfile, run_dir)
                    times[name].append(first_step_s(procs, run_dir, started))
                    stop(procs, run_dir)
            teardowns = [teardown_s(sshd, recipe, hostfile, tmp / f"kill-{i}") for i in range(args.rounds)]
    for name, values in times.items():
        print(f"{name:26s} first step after {statistics.median(values):5.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(times["sdtrain launch (ssh)"]) / statistics.median(times["torchrun per node (ssh)"])
    print(f"ratio sdtrain / torchrun-by-hand: {ratio:.2f}")
    print(f"teardown after killing rank 3 on {HOSTS[1]}: every process gone after {statistics.median(teardowns):.2f} s "
          f"(rounds: {', '.join(f'{v:.2f}' for v in teardowns)})")


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "200")
    main()
