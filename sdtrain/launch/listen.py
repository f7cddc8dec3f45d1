"""Where a job listens: the master address only, never every interface.

Torch's static rendezvous starts its TCPStore on node 0 listening on every interface
(`::`), and the store has no authentication: anyone who reaches the port can read and
write the job's keys. TCPStore also accepts a socket that is already listening
(`master_listen_fd`), so node 0 binds that socket itself, to the address the master name
resolves to here: loopback for a job on one machine, the master's interface for a
multi-node job. Every other node and every worker is only a client of that store (torch's
agent store), so nothing else listens for it.

A job whose master is a loopback address runs on this machine only, so its workers'
collectives (gloo, NCCL's bootstrap) are kept on the loopback interface too, unless the
user chose an interface. Imported by the node agent only: it needs torch.
"""

from __future__ import annotations

import os
import socket

import psutil
from torch.distributed import TCPStore
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous, create_rdzv_handler

from sdtrain.launch.placement import is_loopback

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


def _create_handler(params: RendezvousParameters) -> RendezvousHandler:
    static = create_rdzv_handler(params)
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

