"""A job listens on its master address only: never on every interface, whoever can reach
the machine (the rendezvous store has no authentication)."""

import datetime
import ipaddress
import signal
import socket

import psutil
import pytest

from test_failures import LONG, start_launch, wait_for_training


def listening_addresses(procs) -> list[tuple[int, str, str, int]]:
    found = []
    for p in procs:
        try:
            found += [(p.pid, " ".join(p.cmdline()[:3]), c.laddr.ip, c.laddr.port)
                      for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_local_job_listens_on_loopback_only(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    launcher = start_launch(write_recipe(LONG), run_dir)
    try:
        procs = [psutil.Process(launcher.pid), *wait_for_training(launcher, run_dir)]
        listening = listening_addresses(procs)
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=30)
    assert any("sdtrain.launch.node" in cmd for _, cmd, _, _ in listening), f"no rendezvous store found: {listening}"
    wide = [entry for entry in listening if not ipaddress.ip_address(entry[2]).is_loopback]
    assert not wide, f"listening beyond loopback: {wide}"


def test_the_store_binds_the_master_address_and_nothing_wider():
    """127.0.0.2 stands for a multi-node master's own address: that one, not 127.0.0.1 or `*`."""
    from torch.distributed import TCPStore

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
