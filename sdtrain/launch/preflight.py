"""`sdtrain preflight --hostfile F`: what would go wrong on each host, before a launch.

Every host of the (filtered) hostfile is probed over ssh, in parallel, with the same
directory, interpreter and ssh options a launch uses (probe.py runs there). Per host:
ssh reachable; Python and torch versions equal to the launcher's; GPUs vs slots; on the
master, the rendezvous port free; the master address and the interface it resolves to; the
memory a rank may have there (each GPU's free memory, or the host's / its cgroup's room shared
by its slots), and with --recipe whether the recipe's estimate per rank fits in it. Every
failed check comes with a hint saying how to fix it.
"""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sdtrain.console_table import FoldingColumn, FoldingTable
from sdtrain.launch.hostfile import read_hostfile, select_resources
from sdtrain.launch.placement import (
    DEFAULT_MASTER_PORT,
    LaunchRequest,
    is_loopback,
    is_this_machine,
)
from sdtrain.launch.plan import Node
from sdtrain.launch.probe import torch_version
from sdtrain.launch.runners import RemoteSetup, ssh_command

PASS, FAIL, WARN, NONE = "✓", "✗", "!", "–"
COLUMNS = ("ssh", "python", "torch", "devices", "master port", "master address", "memory")
PROBE_TIMEOUT_S = 30


@dataclass
class HostReport:
    node: Node
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (mark, detail)
    hints: list[str] = field(default_factory=list)

    def check(self, column: str, mark: str, detail: str, hint: str = "") -> None:
        self.checks[column] = (mark, detail)
        if mark == FAIL and hint:
            self.hints.append(f"{column}: {hint}")

    @property
    def failed(self) -> bool:
        return any(mark == FAIL for mark, _ in self.checks.values())


def run_preflight(request: LaunchRequest, setup: RemoteSetup, recipe=None) -> list[HostReport]:
    """`recipe` (resolved, or None): also check that its estimate per rank fits on every host."""
    resources = select_resources(read_hostfile(request.hostfile), **request.filters)
    nodes = [Node(host, tuple(slots), rank) for rank, (host, slots) in enumerate(resources.items())]
    master = request.master_addr or nodes[0].host
    port = request.master_port or (None if is_this_machine(master) else DEFAULT_MASTER_PORT)
    plan = (recipe, sum(len(node.slots) for node in nodes)) if recipe is not None else None
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        return list(pool.map(lambda node: check_host(node, master, port, setup, plan), nodes))


def check_host(node: Node, master: str, port: int | None, setup: RemoteSetup, plan=None) -> HostReport:
    report = HostReport(node)
    is_master = node.node_rank == 0
    probe = [setup.python, "-m", "sdtrain.launch.probe", "--master-addr", master]
    if is_master and port:
        probe += ["--port", str(port)]
    argv = ssh_command(node, probe, setup)
    try:
        result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        report.check("ssh", FAIL, f"no answer in {PROBE_TIMEOUT_S} s", "the host is down or a firewall drops ssh")
        return report
    last = (result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode == 255:
        port = ["-p", str(setup.ssh_port)] if setup.ssh_port else []
        command = shlex.join(["ssh", *setup.ssh_options, *port, "-o", "BatchMode=yes", node.host, "true"])
        report.check("ssh", FAIL, last, f"`{command}` must work without a password prompt "
                                        "(keys in ~/.ssh, or --ssh-options '-i KEY'; --ssh-port for another port)")
        return report
    report.check("ssh", PASS, "reachable")
    try:
        found = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report.check("python", FAIL, last or f"exit code {result.returncode}",
                     f"every node needs {setup.python} with sdtrain installed, in {setup.cwd} "
                     "(the same paths as here: a shared filesystem, or the same install on each node)")
        return report
    _versions(report, found)
    _devices(report, found, node)
    _master(report, found, node, master, port, is_master)
    _memory(report, found, node, plan)
    return report


def _versions(report: HostReport, found: dict) -> None:
    ours = platform.python_version()
    if found["python"] == ours:
        report.check("python", PASS, ours)
    else:
        report.check("python", FAIL, f"{found['python']} (here {ours})", f"install Python {ours} at {found['executable']}")
    torch = torch_version()
    if found["torch"] == torch:
        report.check("torch", PASS, torch or "")
    else:
        report.check("torch", FAIL, f"{found['torch'] or 'not installed'} (here {torch})",
                     f"pip install torch=={torch} into {found['executable']}")


def _devices(report: HostReport, found: dict, node: Node) -> None:
    gpus, slots = found["gpus"], node.slots
    if gpus == 0:
        report.check("devices", WARN, f"no GPU: {len(slots)} CPU worker(s) on gloo")
    elif max(slots) < gpus:
        report.check("devices", PASS, f"{gpus} GPU(s) for slots {','.join(map(str, slots))}")
    else:
        report.check("devices", FAIL, f"{gpus} GPU(s), slots up to {max(slots)}",
                     f"give {node.host} slots={gpus} in the hostfile, or --num-gpus / --include fewer")


def _master(report: HostReport, found: dict, node: Node, master: str, port: int | None, is_master: bool) -> None:
    if not is_master:
        report.check("master port", NONE, "")
    elif port is None:
        report.check("master port", PASS, "a free one is picked at launch")
    elif found["port_free"]:
        report.check("master port", PASS, f"{port} free")
    else:
        report.check("master port", FAIL, f"{port} in use", "stop what listens there, or pick another with --master-port")
    addresses = found["master_addresses"]
    interfaces = found["master_interfaces"]
    shown = ", ".join(f"{a} ({interfaces[a]})" if a in interfaces else a for a in addresses)
    if not addresses:
        report.check("master address", FAIL, f"{master} does not resolve",
                     f"add {master} to DNS or /etc/hosts on {node.host}, or give --master-addr IP")
    elif is_master and not interfaces:
        report.check("master address", FAIL, f"{shown}: not an address of this host",
                     "--master-addr must name the first host (or pass the address of the master)")
    elif not is_master and interfaces and not is_loopback(node.host):
        report.check("master address", FAIL, f"{shown}: this host's own address",
                     f"{master} resolves to {node.host} itself here (a 127.0.x.1 line in /etc/hosts?); "
                     "give --master-addr the master's IP")
    else:
        report.check("master address", PASS, shown)


def _memory(report: HostReport, found: dict, node: Node, plan) -> None:
    """Each rank's budget here; with a recipe (plan = (recipe, world size)), its estimate in it."""
    memory = found.get("memory")
    if not memory:
        report.check("memory", NONE, "")
        return
    from sdtrain.estimate.fit import Budget
    from sdtrain.estimate.verdict import judge

    gpus = memory.get("gpu_free_bytes") or []
    if gpus:
        device, budget = "cuda", Budget(min(gpus), "the smallest free GPU memory")
    else:
        device, budget = "cpu", Budget(memory["cpu_bytes"] / len(node.slots),
                                       f"{memory['cpu_source']}, shared by {len(node.slots)} worker(s)")
    if plan is None:
        report.check("memory", PASS, f"{budget.per_rank / 2**30:.1f} GiB per rank")
        return
    verdict = judge(plan[0], plan[1], device, budget)
    detail = f"needs {verdict.estimate.total / 2**30:.2f} of {budget.per_rank / 2**30:.2f} GiB per rank"
    if verdict.fits:
        report.check("memory", PASS, detail)
    else:
        report.check("memory", FAIL, detail, f"will not fit: largest terms {verdict.largest_terms()}; {verdict.advice()}")


def preflight_table(reports: list[HostReport]) -> FoldingTable:
    """Where the checks do not fit across, each host's stand in a table of their own: nothing is
    cut to "…" (console_table.py)."""
    table = FoldingTable("preflight", [FoldingColumn(column, wraps=True) for column in ("host", *COLUMNS)],
                         stack_when_narrow=True)
    for report in reports:
        cells = [report.checks.get(column, (NONE, "")) for column in COLUMNS]
        table.add_row(report.node.host, *(f"{mark} {detail}".strip() for mark, detail in cells))
    return table
