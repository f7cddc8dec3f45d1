"""What `sdtrain preflight` asks each host, run there: `python -m sdtrain.launch.probe`.

Prints one JSON object: Python and torch versions (torch is not imported: that takes
seconds, its version is in its metadata), visible GPUs, whether the master port is free
(on the master), and what the master address resolves to from here.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

import psutil

from sdtrain.launch.plan import visible_gpu_count


def torch_version() -> str | None:
    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def port_free(port: int) -> bool:
    """Free for the rendezvous store, which listens on every interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def resolve(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)})
    except (socket.gaierror, UnicodeError):
        return []


def interfaces_of(addresses: list[str]) -> dict[str, str]:
    """address -> the name of this host's interface that has it."""
    owner = {a.address: name for name, nic in psutil.net_if_addrs().items() for a in nic}
    return {address: owner[address] for address in addresses if address in owner}


def probe(master_addr: str, port: int | None) -> dict:
    addresses = resolve(master_addr)
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch_version(),
        "gpus": visible_gpu_count(),
        "port_free": port_free(port) if port else None,
        "master_addresses": addresses,
        "master_interfaces": interfaces_of(addresses),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="sdtrain preflight probe (run on each host by `sdtrain preflight`)")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--port", type=int, help="check that this port is free here (the master)")
    args = p.parse_args(argv)
    print(json.dumps(probe(args.master_addr, args.port)))


if __name__ == "__main__":
    main()
