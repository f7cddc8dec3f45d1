"""What `sdtrain preflight` asks each host, run there: `python -m sdtrain.launch.probe`.

Prints one JSON object: Python and torch versions (torch is not imported: that takes
seconds, its version is in its metadata), visible GPUs, whether the master port is free
(on the master), what the master address resolves to from here, and the memory a rank may have.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import subprocess
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
        "memory": memory_here(),
    }


def memory_here() -> dict:
    """What a rank here may have: the host's (or its cgroup's) room, and each GPU's free
    memory from nvidia-smi (importing torch would take seconds)."""
    from sdtrain.estimate.fit import host_room

    room, source = host_room()
    gpu_free = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            gpu_free = [int(line) * 2**20 for line in out.stdout.split()]  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return {"cpu_bytes": int(room), "cpu_source": source, "gpu_free_bytes": gpu_free}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="sdtrain preflight probe (run on each host by `sdtrain preflight`)")
    p.add_argument("--master-addr", required=True)
    p.add_argument("--port", type=int, help="check that this port is free here (the master)")
    args = p.parse_args(argv)
    print(json.dumps(probe(args.master_addr, args.port)))


if __name__ == "__main__":
    main()
