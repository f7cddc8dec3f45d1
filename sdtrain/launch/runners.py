"""Command builders: pure functions from a launch plan to one argv list per node.

No shell strings: each command is a list handed to exec. Where a command passes through a
remote shell (ssh, pdsh), that shell gets one string in which every value is shlex.quote'd.

Every node runs the same node agent with its node rank, the master address and port, and
its slots; the runners differ only in how they get it there:

    local   PYTHON -m sdtrain.launch.node ...            (this machine)
    ssh     ssh [OPTIONS] -- HOST 'cd CWD && exec env K=V... PYTHON -m sdtrain.launch.node ...'
    pdsh    env PDSH_SSH_ARGS_APPEND=... pdsh -S -N -R ssh -w HOST '<the same>'
    slurm   srun --nodes=1 --ntasks=1 --nodelist=HOST --overlap --chdir=CWD env K=V... PYTHON -m ...
    mpirun  mpirun -n 1 --host HOST --bind-to none --wdir CWD env K=V... PYTHON -m ...

One command per node, for every runner: each node's exit status, failure report and stderr
are seen on their own, and rank order is the plan's, never a tool's host sorting. Remote
nodes run the launcher's interpreter in the launcher's working directory.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from sdtrain.errors import UserInputError
from sdtrain.launch.plan import LaunchPlan, Node

RUNNERS = ("local", "ssh", "pdsh", "slurm", "mpirun")

# How the supervisor asks a node to stop (supervise.py): "signal" the command (srun and
# mpirun forward it to the node), "close-stdin" (ssh carries the end of file to the node
# agent and stays until the node has stopped), "signal-tree" (pdsh leaves its ssh behind
# if only pdsh is signalled).
STOP_BY = {"local": "signal", "ssh": "close-stdin", "pdsh": "signal-tree", "slurm": "signal", "mpirun": "signal"}

# Never a password prompt that hangs in the background; a dead node or network noticed in
# 15 s instead of a hang; a node that does not answer in 10 s is an error.
SSH_DEFAULTS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclass(frozen=True)
class RemoteSetup:
    """What every remote node gets beyond the plan."""

    cwd: str
    python: str
    env: dict[str, str] = field(default_factory=dict)  # exported variables (exports.py)
    ssh_port: int | None = None
    ssh_options: tuple[str, ...] = ()  # the user's, before ours: ssh keeps the first value of an option
    run_as_root: bool = False  # mpirun refuses root without --allow-run-as-root
    pdsh_ssh_args: str = ""  # PDSH_SSH_ARGS_APPEND already in the launcher's environment


def node_agent_argv(plan: LaunchPlan, node: Node, run_dir: str, recipe_json: str, resume_from: str,
                    python: str = sys.executable, attempt: int = 0) -> list[str]:
    # A restarted job (launch.max_restarts) tells its nodes which attempt they run.
    return [
        python, "-m", "sdtrain.launch.node",
        "--nnodes", str(len(plan.nodes)),
        "--node-rank", str(node.node_rank),
        "--nproc", str(len(node.slots)),
        "--slots", ",".join(map(str, node.slots)),
        "--master-addr", plan.master_addr,
        "--master-port", str(plan.master_port),
        "--run-dir", run_dir,
        "--run-id", plan.run_id,
        "--recipe-json", recipe_json,
        "--resume-from", resume_from,
    ] + (["--attempt", str(attempt)] if attempt else [])


def local_commands(plan: LaunchPlan, run_dir: str, recipe_json: str, resume_from: str,
                   attempt: int = 0) -> list[list[str]]:
    """Every node's agent started directly on this machine (one node: the local launcher)."""
    return [node_agent_argv(plan, node, run_dir, recipe_json, resume_from, attempt=attempt) for node in plan.nodes]


def remote_commands(plan: LaunchPlan, run_dir: str, recipe_json: str, resume_from: str,
                    setup: RemoteSetup, attempt: int = 0) -> list[list[str]]:
    build = {"ssh": ssh_command, "pdsh": pdsh_command, "slurm": srun_command, "mpirun": mpirun_command}[plan.launcher]
    extra = ["--remote", "--stop-on-stdin-eof"] if plan.launcher == "ssh" else ["--remote"]
    return [
        build(node, node_agent_argv(plan, node, run_dir, recipe_json, resume_from, setup.python, attempt) + extra, setup)
        for node in plan.nodes
    ]


def ssh_command(node: Node, agent: list[str], setup: RemoteSetup) -> list[str]:
    # `--`: whatever the host is called, ssh reads it as the host, never as an option.
    return ["ssh", *ssh_words(setup), "--", node.host, remote_shell(agent, setup)]


def pdsh_command(node: Node, agent: list[str], setup: RemoteSetup) -> list[str]:
    ssh_args = " ".join(filter(None, [setup.pdsh_ssh_args, _single_words(ssh_words(setup), "pdsh")]))
    return ["env", f"PDSH_SSH_ARGS_APPEND={ssh_args}", "pdsh", "-S", "-N", "-R", "ssh", "-w", node.host, remote_shell(agent, setup)]


def srun_command(node: Node, agent: list[str], setup: RemoteSetup) -> list[str]:
    # --overlap: a step may share the node with the batch script's or another step's.
    return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node.host}", "--overlap", f"--chdir={setup.cwd}",
            f"--job-name=sdtrain-node{node.node_rank}", *env_argv(setup), *agent]


def mpirun_command(node: Node, agent: list[str], setup: RemoteSetup) -> list[str]:
    # --bind-to none: OpenMPI would pin the agent, and every worker it starts, to one core.
    argv = ["mpirun", "-n", "1", "--host", node.host, "--bind-to", "none", "--wdir", setup.cwd]
    if setup.run_as_root:
        argv.append("--allow-run-as-root")
    argv += ["--mca", "plm_rsh_args", _single_words(ssh_words(setup), "mpirun")]
    return argv + env_argv(setup) + agent


def ssh_words(setup: RemoteSetup) -> list[str]:
    port = ["-p", str(setup.ssh_port)] if setup.ssh_port else []
    return [*setup.ssh_options, *port, *SSH_DEFAULTS]


def env_argv(setup: RemoteSetup) -> list[str]:
    return ["env", *(f"{key}={value}" for key, value in setup.env.items())] if setup.env else []


def remote_shell(argv: list[str], setup: RemoteSetup) -> str:
    """The one string a remote login shell runs: same directory, exported variables, exec."""
    return f"cd {shlex.quote(setup.cwd)} && exec {shlex.join(env_argv(setup) + argv)}"


def _single_words(words: list[str], tool: str) -> str:
    """pdsh and mpirun split their ssh arguments on spaces, with no quoting."""
    for word in words:
        if not word or any(ch.isspace() for ch in word):
            raise UserInputError(f"--ssh-options: {tool} passes ssh options split on spaces, so {word!r} cannot reach ssh "
                                 "intact; put it in ~/.ssh/config instead")
    return " ".join(words)
