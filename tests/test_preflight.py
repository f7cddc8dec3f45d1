"""Preflight's judgement of what a host reported (the real probe over sshd is in test_multinode)."""

import platform

from sdtrain.launch.plan import Node
from sdtrain.launch.preflight import FAIL, PASS, WARN, HostReport, _devices, _master, _versions
from sdtrain.launch.probe import port_free, probe, torch_version


def found(**extra):
    return {"python": platform.python_version(), "executable": "/venv/bin/python", "torch": torch_version(), "gpus": 0,
            "port_free": True, "master_addresses": ["10.0.0.1"], "master_interfaces": {}, **extra}


def judged(check, *args):
    report = HostReport(Node("w1", (0, 1), 1))
    check(report, *args)
    return report


def test_versions_must_equal_the_launchers():
    report = judged(_versions, found())
    assert report.checks["python"][0] == PASS and report.checks["torch"][0] == PASS and not report.failed
    report = judged(_versions, found(python="3.9.1", torch=None))
    assert report.checks["python"] == (FAIL, f"3.9.1 (here {platform.python_version()})")
    assert report.checks["torch"][1].startswith("not installed")
    assert any("install Python" in h for h in report.hints) and any("pip install torch==" in h for h in report.hints)


def test_devices_against_slots():
    node = Node("w1", (0, 1, 2), 1)
    assert judged(_devices, found(gpus=4), node).checks["devices"] == (PASS, "4 GPU(s) for slots 0,1,2")
    report = judged(_devices, found(gpus=2), node)
    assert report.checks["devices"] == (FAIL, "2 GPU(s), slots up to 2") and "slots=2" in report.hints[0]
    assert judged(_devices, found(gpus=0), node).checks["devices"][0] == WARN  # CPU nodes run gloo


def test_master_port_and_address():
    master, worker = Node("w0", (0,), 0), Node("w1", (0,), 1)
    ok = found(master_addresses=["10.0.0.1"], master_interfaces={"10.0.0.1": "eth0"})
    report = judged(_master, ok, master, "w0", 29500, True)
    assert report.checks["master port"] == (PASS, "29500 free") and report.checks["master address"] == (PASS, "10.0.0.1 (eth0)")
    report = judged(_master, found(port_free=False), master, "w0", 29500, True)
    assert report.checks["master port"] == (FAIL, "29500 in use") and "--master-port" in report.hints[0]
    assert "not an address of this host" in report.checks["master address"][1]
    report = judged(_master, found(master_addresses=[]), worker, "w0", 29500, False)
    assert report.checks["master address"] == (FAIL, "w0 does not resolve") and "/etc/hosts" in report.hints[0]
    report = judged(_master, ok, worker, "w0", 29500, False)  # w0 resolves to w1's own address
    assert report.checks["master address"][0] == FAIL and "itself" in report.hints[0]


def test_probe_runs_here():
    here = probe("127.0.0.1", None)
    assert here["python"] == platform.python_version() and here["master_interfaces"] == {"127.0.0.1": "lo"}
    assert isinstance(port_free(0), bool)
