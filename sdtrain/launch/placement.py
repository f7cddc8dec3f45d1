"""From the command line to the launch plan: which hosts, which slots, which runner.

- No hostfile: this machine, `nproc` workers (the local launch), narrowed by --include /
  --exclude / --num-gpus as DeepSpeed does for `localhost`.
- A hostfile: its hosts in file order, filtered (hostfile.py). The runner defaults to ssh,
  or to local when the only host left is this machine.
- `--launcher slurm` inside an allocation needs no hostfile: the hosts are the allocation's
  (SLURM_JOB_NODELIST) with `nproc` slots each.
- `--node-rank R`: every node starts its own launcher (Kubernetes, or by hand); this one
  runs node R of the plan locally, and the master port must be fixed in advance.

The master is the first host unless --master-addr says otherwise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from dataclasses import dataclass

import psutil

from sdtrain.errors import UserInputError, excerpt
from sdtrain.launch.hostfile import (
    MAX_SLOTS,
    Resources,
    check_host,
    expand_hostlist,
    read_hostfile,
    select_resources,
    some,
)
from sdtrain.launch.plan import LaunchPlan, Node, free_port
from sdtrain.launch.runners import RUNNERS

DEFAULT_MASTER_PORT = 29500  # torch's; used where the port cannot be checked free from here


@dataclass(frozen=True)
class LaunchRequest:
    """What the command line asked for, before any of it is checked."""

    hostfile: str | None = None
    include: str = ""
    exclude: str = ""
    num_nodes: int | None = None
    num_gpus: int | None = None
    launcher: str | None = None  # None: local without a hostfile, else ssh (or local for this machine alone)
    master_addr: str | None = None
    master_port: int | None = None
    node_rank: int | None = None  # run only this node of the plan, here
    ssh_port: int | None = None
    ssh_options: str = ""  # extra ssh arguments, split like a shell would
    allow_env_file_vars: tuple[str, ...] = ()  # guarded names .sdtrain_env may set (exports.py)

    @property
    def filters(self) -> dict:
        return {"include": self.include, "exclude": self.exclude, "num_nodes": self.num_nodes, "num_gpus": self.num_gpus}


def build_plan(request: LaunchRequest, nproc: int, nproc_given: bool, backend: str,
               recipe_port: int | None, run_id: str, environ: dict[str, str]) -> tuple[LaunchPlan, str]:
    """The plan and the runner that will start it; UserInputError for anything inconsistent."""
    if request.launcher is not None and request.launcher not in RUNNERS:
        raise UserInputError(f"--launcher {request.launcher}: choose one of {', '.join(RUNNERS)}")
    launcher = request.launcher
    if request.hostfile:
        if nproc_given:
            raise UserInputError("--nproc-per-node does not go with --hostfile: the hostfile's slots say how many "
                                 "workers each host runs (--num-gpus N takes the first N of each)")
        resources = select_resources(read_hostfile(request.hostfile), **request.filters)
        if launcher == "slurm":
            _check_in_allocation(resources, environ)
    elif launcher == "slurm":
        resources = select_resources(dict.fromkeys(allocation_hosts(environ), nproc), **request.filters)
    elif launcher in ("ssh", "pdsh", "mpirun"):
        raise UserInputError(f"--launcher {launcher} needs --hostfile (lines of 'HOST slots=N')")
    else:
        resources = _local_resources(nproc, request)
    if request.node_rank is not None:
        if not 0 <= request.node_rank < len(resources):
            raise UserInputError(f"--node-rank {request.node_rank}: the plan has {len(resources)} node(s); give 0..{len(resources) - 1}")
        if launcher not in (None, "local"):
            raise UserInputError(f"--node-rank runs one node here, without a runner; drop --launcher {launcher}")
        launcher = "local"
    elif launcher is None:
        launcher = "local" if not request.hostfile or _only_this_machine(resources) else "ssh"
    elif launcher == "local" and not _only_this_machine(resources):
        raise UserInputError(f"--launcher local runs on this machine only, and the plan has hosts {', '.join(resources)}; "
                             "use --launcher ssh (or pdsh, slurm, mpirun)")
    nodes = [Node(host, tuple(slots), rank) for rank, (host, slots) in enumerate(resources.items())]
    if request.master_addr is not None:
        _check_master_addr(request.master_addr)
    # One node on this machine (the local runner) meets on loopback, whatever the host is called.
    master_addr = request.master_addr or ("127.0.0.1" if launcher == "local" and request.node_rank is None else nodes[0].host)
    if request.master_addr is None and len(nodes) > 1 and is_loopback(master_addr) \
            and not all(is_this_machine(node.host) for node in nodes):
        raise UserInputError(f"the master is the first host, {master_addr}, a loopback address the other hosts cannot "
                             "reach: list the first host by a name or address the others can reach, or give --master-addr")
    port = request.master_port or recipe_port
    if port is None:
        fixed = request.node_rank is not None or not is_this_machine(master_addr)
        port = DEFAULT_MASTER_PORT if fixed else free_port()
    if request.node_rank is not None:
        # Torch's rendezvous keys its store by run id, so every node's launcher must derive the same one.
        run_id = hashlib.sha1(f"{master_addr}:{port}:{','.join(resources)}".encode()).hexdigest()[:12]
    return LaunchPlan(nodes, master_addr, port, backend, run_id, launcher=launcher), launcher


def _local_resources(nproc: int, request: LaunchRequest) -> Resources:
    """DeepSpeed without a hostfile: one host, `localhost`, with `nproc` slots; --num-gpus
    sets the worker count outright (there is no slot count to check it against)."""
    if request.num_nodes not in (None, 1):
        raise UserInputError(f"--num-nodes {request.num_nodes} needs a hostfile that lists the nodes (--hostfile)")
    count = request.num_gpus or nproc
    if count > MAX_SLOTS:
        raise UserInputError(f"{count} workers on one machine: at most {MAX_SLOTS} (one per device); "
                             "use a hostfile to spread a job over machines")
    return select_resources({"localhost": count}, include=request.include, exclude=request.exclude)


def allocation_hosts(environ: dict[str, str]) -> list[str]:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not environ.get("SLURM_JOB_ID") or not nodelist:
        raise UserInputError("--launcher slurm runs inside a Slurm allocation (no SLURM_JOB_ID here): "
                             "salloc -N2 sdtrain launch ... --launcher slurm, or sbatch launcher/slurm.sbatch")
    try:
        return [check_host(host, "SLURM_JOB_NODELIST") for host in expand_hostlist(nodelist)]
    except ValueError:
        raise UserInputError(f"SLURM_JOB_NODELIST {excerpt(nodelist)} is not a Slurm host list") from None


def _check_master_addr(addr: str) -> None:
    """The master address becomes an argument of every node's command: a host name or an IP address."""
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        check_host(addr, "--master-addr")


def _check_in_allocation(resources: Resources, environ: dict[str, str]) -> None:
    allocated = allocation_hosts(environ)
    known = set(allocated)  # a list would make this hosts x nodes: minutes at tens of thousands
    outside = [host for host in resources if host not in known]
    if outside:
        raise UserInputError(f"hosts {some(outside)} are not in this Slurm allocation (nodes: {some(allocated)})")


def _only_this_machine(resources: Resources) -> bool:
    return len(resources) == 1 and is_this_machine(next(iter(resources)))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_this_machine(host: str) -> bool:
    """True if `host` names this machine: a loopback address, or one of its interfaces."""
    if is_loopback(host) or host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    own = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    return any(is_loopback(a) or a in own for a in addresses)
