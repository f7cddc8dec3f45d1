"""A job on one node listens nowhere (its rendezvous store is a private file); a multi-node
job's store listens on its master address only, never on every interface (the store has
no authentication)."""

import datetime
import ipaddress
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import psutil
import pytest
from torch.distributed import TCPStore

from test_failures import LONG, start_launch, wait_for_training, worker_with_rank


def listening_addresses(procs) -> list[tuple[int, str, str, int]]:
    found = []
    for p in procs:
        try:
            found += [(p.pid, " ".join(p.cmdline()[:3]), c.laddr.ip, c.laddr.port)
                      for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_local_job_listens_nowhere_and_its_store_is_private(write_recipe, tmp_path):
    """The reproduction: a second process on the machine tries to read the job's rendezvous
    store while it trains. There is no port (nothing of the node agent listens; the workers'
    gloo, on loopback only), and the store file lies in a 0700 directory of the job's user,
    which another user (`nobody`, where the test can switch to one) cannot open."""
    run_dir = tmp_path / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    try:
        procs = [psutil.Process(launcher.pid), *wait_for_training(launcher, run_dir)]
        listening = listening_addresses(procs)
        agent = next(p for p in procs if "sdtrain.launch.node" in " ".join(p.cmdline()))
        port = agent.cmdline()[agent.cmdline().index("--master-port") + 1]
        store_file = Path(worker_with_rank(procs, 0).environ()["SDTRAIN_STORE_FILE"])
        folder = store_file.parent.stat()
        with pytest.raises(RuntimeError):  # torch's DistNetworkError: nobody answers at the master port
            TCPStore("127.0.0.1", int(port), 1, False, datetime.timedelta(seconds=3)).get("torchelastic/role_info/0")
        other_user = subprocess.run(["cat", str(store_file)], capture_output=True, text=True, timeout=30, cwd="/",
                                    user="nobody") if os.geteuid() == 0 else None
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=30)
    assert not [entry for entry in listening if "sdtrain.launch.node" in entry[1]], listening
    wide = [entry for entry in listening if not ipaddress.ip_address(entry[2]).is_loopback]
    assert not wide, f"listening beyond loopback: {wide}"
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.geteuid()
    if other_user is not None:
        assert other_user.returncode != 0 and "Permission denied" in other_user.stderr, other_user
    assert not store_file.parent.exists()  # removed with the job


def test_the_store_binds_the_master_address_and_nothing_wider():
    """127.0.0.2 stands for a multi-node master's own address: that one, not 127.0.0.1 or `*`."""
    from sdtrain.launch.listen import MasterOnlyRendezvous

    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    port = sock.getsockname()[1]
    sock.close()
    rendezvous = MasterOnlyRendezvous("127.0.0.2", port, rank=0, world_size=1, run_id="t", timeout=10)
    info = rendezvous.next_rendezvous()
    try:
        mine = [c.laddr for c in psutil.Process().net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert [(a.ip, a.port) for a in mine] == [("127.0.0.2", port)]
        client = TCPStore("127.0.0.2", port, 1, False, datetime.timedelta(seconds=10))
        client.set("t/key", "value")  # the rendezvous prefixes its keys with the run id
        assert info.store.get("key") == b"value"
    finally:
        del info, rendezvous


def test_an_address_of_another_host_is_refused_by_name():
    from sdtrain.launch.listen import MasterBindError, listen_on

    with pytest.raises(MasterBindError, match="192.0.2.1.*--master-addr must name an address of the first host"):
        listen_on("192.0.2.1", 29999)  # TEST-NET-1: never an address of this machine
