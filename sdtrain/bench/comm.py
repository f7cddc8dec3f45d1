"""`sdtrain bench comm`: collectives timed and checked, launched like any job.

The hosts, slots and runner come from the same plan as `sdtrain launch` (a hostfile and
DeepSpeed's filters, or this machine's workers), every node runs the comm bench's node
agent through the same runner (local, ssh, pdsh, slurm, mpirun), and the same Supervisor
watches them: fail-fast, no process left behind, the failing rank named. Nothing here
imports torch; the workers do.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path

import psutil

from sdtrain.bench.comm_spec import check_memory
from sdtrain.errors import UserInputError
from sdtrain.launch.placement import LaunchRequest, build_plan
from sdtrain.launch.plan import Node, resolve_backend, visible_gpu_count
from sdtrain.launch.rundir import MARKER
from sdtrain.launch.runners import STOP_BY, mpirun_command, pdsh_command, srun_command, ssh_command
from sdtrain.launch.supervise import Supervisor

RESULT = "comm.json"
REMOTE = {"ssh": ssh_command, "pdsh": pdsh_command, "slurm": srun_command, "mpirun": mpirun_command}


class CommBenchFailed(Exception):
    """A rank died or a node could not start: the message names the root cause."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code  # 1 a failed run, 130 interrupted (as `sdtrain launch`)


def default_nproc(backend: str) -> int:
    """One worker per visible GPU; on a CPU machine two (a collective needs two ranks)."""
    gpus = visible_gpu_count()
    return gpus if gpus and backend != "gloo" else 2


def run_comm_bench(request: LaunchRequest, nproc: int | None, backend: str, ops: list[str], sizes: list[int],
                   iters: int, repeats: int, timeout_s: int = 300) -> dict:
    if nproc is not None and request.hostfile:
        raise UserInputError("--nproc does not go with --hostfile: the hostfile's slots say how many workers each host runs")
    workers = 0 if request.hostfile else (nproc if nproc is not None else default_nproc(backend))
    plan, launcher = build_plan(request, workers, nproc is not None, backend, None, uuid.uuid4().hex[:12], dict(os.environ))
    if plan.world_size < 2:
        raise UserInputError(f"a collective needs at least 2 ranks; this plan has {plan.world_size} (give --nproc 2 or more)")
    if backend == "nccl" and launcher == "local" and visible_gpu_count() < plan.world_size:
        raise UserInputError(f"backend nccl with {plan.world_size} ranks needs as many GPUs here; {visible_gpu_count()} visible")
    spec = {"ops": ops, "sizes": sizes, "iters": iters, "repeats": repeats, "timeout_s": timeout_s,
            "backend": resolve_backend(backend) if launcher == "local" else backend}  # "auto" decided on each node
    if launcher == "local" and spec["backend"] == "gloo":  # every rank's buffers in this machine's memory
        check_memory(sizes, plan.world_size, psutil.virtual_memory().available)
    with tempfile.TemporaryDirectory(prefix="sdtrain-comm-") as tmp:
        run_dir = Path(tmp)
        (run_dir / MARKER).write_text(plan.run_id + "\n")  # remote nodes that see it share the directory
        commands = [_agent(plan, node, str(run_dir), json.dumps(spec), sys.executable) for node in plan.nodes]
        remote = {}
        if launcher != "local":
            from sdtrain.launch.job import remote_setup

            setup = remote_setup(request)
            extra = ["--remote", "--stop-on-stdin-eof"] if launcher == "ssh" else ["--remote"]
            commands = [REMOTE[launcher](node, _agent(plan, node, str(run_dir), json.dumps(spec), setup.python) + extra, setup)
                        for node in plan.nodes]
            remote = dict(labels=[f"node {n.node_rank} {n.host}" for n in plan.nodes], nodes=plan.nodes, stop_by=STOP_BY[launcher],
                          run_dir=run_dir)
        outcome = Supervisor(commands, **remote).run()
        if not outcome.ok:
            raise CommBenchFailed(_explain(outcome, run_dir), 130 if outcome.interrupted else 1)
        result = json.loads((run_dir / RESULT).read_text())
    result.update(launcher=launcher, nodes=len(plan.nodes))
    return result


def _agent(plan, node: Node, run_dir: str, spec_json: str, python: str) -> list[str]:
    return [python, "-m", "sdtrain.bench.comm_node", "--nnodes", str(len(plan.nodes)), "--node-rank", str(node.node_rank),
            "--nproc", str(len(node.slots)), "--slots", ",".join(map(str, node.slots)),
            "--master-addr", plan.master_addr, "--master-port", str(plan.master_port), "--run-dir", run_dir,
            "--run-id", plan.run_id, "--spec-json", spec_json]


def _explain(outcome, run_dir: Path) -> str:
    """The root-cause rank, from the reports the nodes wrote or sent."""
    from sdtrain.launch.failures import root_cause

    if outcome.interrupted:
        return f"interrupted ({outcome.interrupted.name}): every worker stopped"
    failures = [f for report in outcome.reports for f in report.get("failures", [])]
    for path in sorted((run_dir / "failures").glob("node*.json")):
        try:
            failures += json.loads(path.read_text()).get("failures", [])
        except (OSError, ValueError):
            continue
    if not failures:
        tails = [line for tail in outcome.stderr_tails for line in tail[-5:]]
        codes = ", ".join(f"node {i}: {code}" for i, code in enumerate(outcome.exit_codes))
        return "; ".join([*outcome.errors, f"node exit codes {codes}", *tails])
    cause = root_cause(failures)
    lines = [f"rank {cause['rank']} on {cause.get('host', '?')} {cause.get('exit', '')}"]
    detail = (cause.get("traceback") or cause.get("log_tail") or cause.get("error") or "").strip()
    return "\n".join(lines + detail.splitlines()[-15:])
