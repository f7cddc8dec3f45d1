"""Where a job listens: nowhere for a job on one node; the master address only for more.

A job on one node keeps its stores in files (the agent's, and its workers' beside it) in a
directory made for the job, which only its user can enter (0700) and which is removed
after it: another user of the machine has no port to reach and no file to open.

A multi-node job needs a store its nodes reach over the network. Torch's static rendezvous
starts its TCPStore on node 0 listening on every interface (`::`); TCPStore also accepts a
socket that is already listening (`master_listen_fd`), so node 0 binds that socket itself,
to the address the master name resolves to here: the interface the other nodes use. The
store has no authentication: while the job runs, whoever can reach that address and port
can read and write its keys (README, "Multi-node", the runners paragraph). Every
other node and every worker is only a client of that store (torch's agent store), so
nothing else listens for it.

A job whose master is a loopback address runs on this machine only, so its workers'
collectives (gloo, NCCL's bootstrap) are kept on the loopback interface too, unless the
user chose an interface. Imported by the node agent only: it needs torch.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import psutil
from torch.distributed import FileStore, PrefixStore, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.api import RendezvousStoreInfo
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous, create_rdzv_handler

from sdtrain.launch.placement import is_loopback
from sdtrain.parallel.join import STORE_FILE_VARIABLE

BACKEND = "sdtrain-static"


class MasterBindError(OSError):
    """Node 0 cannot listen on the master address (not an address of this host, or port in use)."""


def listen_on(host: str, port: int) -> socket.socket:
    """A listening socket on the first address of `host` that this machine can bind,
    in the order clients resolving the same name will try them."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MasterBindError(f"the master address {host} does not resolve here: {exc}") from None
    reasons = []
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            # A store of the previous run may leave the port in TIME_WAIT; a live listener still refuses.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as exc:
            sock.close()
            reasons.append(f"{address[0]}: {exc.strerror}")
    raise MasterBindError(f"node 0 cannot listen on the master address {host} port {port} ({'; '.join(reasons)}): "
                          "--master-addr must name an address of the first host, and the port must be free there")


class MasterOnlyRendezvous(StaticTCPRendezvous):
    """torch's static rendezvous, with node 0's store listening on the master address only."""

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self):
        if self._store is None and self.rank == 0:
            sock = listen_on(self.master_addr, self.master_port)
            # The store owns the descriptor from here on (it closes it): detach it from Python's socket.
            self._store = TCPStore(self.master_addr, self.master_port, self.world_size, True, self.timeout,
                                   multi_tenant=True, master_listen_fd=sock.detach())
        return super().next_rendezvous()


class PrivateFileRendezvous(RendezvousHandler):
    """A job on one node: the agent's store is a file in `directory`; its workers make
    their own beside it (STORE_FILE_VARIABLE), not a client of this one."""

    def __init__(self, directory: Path, master_addr: str, master_port: int, run_id: str, timeout_s: int):
        self.run_id = run_id
        self.bootstrap = RendezvousStoreInfo(master_addr, master_port)  # torch's agent wants one; nobody listens there
        self._store = FileStore(str(directory / "agent"), 1)
        self._store.set_timeout(timedelta(seconds=timeout_s))

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return False

    def next_rendezvous(self) -> RendezvousInfo:
        return RendezvousInfo(PrefixStore(self.run_id, self._store), 0, 1, self.bootstrap)

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True


@contextmanager
def rendezvous_configs(node_rank: int, nnodes: int, timeout_s: int = 300, environ=os.environ):
    """torch's rdzv_configs for this node. One node: a private directory for the stores
    (mkdtemp makes it 0700), the workers told where, and the directory removed after."""
    if nnodes > 1:
        environ.pop(STORE_FILE_VARIABLE, None)
        yield {"rank": node_rank, "timeout": timeout_s}
        return
    directory = tempfile.mkdtemp(prefix="sdtrain-store-")
    environ[STORE_FILE_VARIABLE] = os.path.join(directory, "workers")
    try:
        yield {"rank": node_rank, "timeout": timeout_s, "store_dir": directory}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _create_handler(params: RendezvousParameters) -> RendezvousHandler:
    static = create_rdzv_handler(params)
    if params.config.get("store_dir"):
        return PrivateFileRendezvous(Path(params.config["store_dir"]), static.master_addr, static.master_port,
                                     static.run_id, int(static.timeout.total_seconds()))
    return MasterOnlyRendezvous(static.master_addr, static.master_port, static.rank, static.world_size,
                                static.run_id, int(static.timeout.total_seconds()))


def register_backend() -> str:
    """Make BACKEND known to torch's launcher (LaunchConfig(rdzv_backend=...)); returns its name."""
    rendezvous_handler_registry.register(BACKEND, _create_handler)
    return BACKEND


def keep_collectives_on_loopback(master_addr: str, environ=os.environ) -> None:
    """A job on one machine (its master is a loopback address) needs no other interface."""
    if not is_loopback(master_addr):
        return
    loopback = loopback_interface()
    if loopback is None:
        return
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        environ.setdefault(name, loopback)


def loopback_interface() -> str | None:
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and is_loopback(a.address) for a in addresses):
            return name
    return None

