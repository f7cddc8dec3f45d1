"""Real cluster programs for the multi-node tests, started and stopped by the tests.

- `running_sshd`: OpenSSH's sshd on a free loopback port with generated host and user
  keys; it answers on 127.0.0.1 and 127.0.0.2, the two "hosts" of the tests.
- `running_slurm`: munged, slurmctld and two slurmd (nodes n1 = 127.0.0.1 and
  n2 = 127.0.0.2) on this machine, with every file in a temporary directory.

Each one skips the test, saying why, where its program is missing or will not start:
nothing here installs packages (`.ci/run` and `make test-multinode` do).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdtrain.launch.plan import free_port

HOSTS = ("127.0.0.1", "127.0.0.2")


def program(name: str, package: str, *extra_dirs: str) -> str:
    path = shutil.which(name) or next((f"{d}/{name}" for d in extra_dirs if os.access(f"{d}/{name}", os.X_OK)), None)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; `make test-multinode` installs it)")
    return path


def wait_until(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
    pytest.skip(f"{what} did not come up within {timeout:.0f} s: {tail.strip() or 'no log'}")


@dataclass
class Sshd:
    port: int
    key: Path

    @property
    def options(self) -> str:
        """--ssh-options for sdtrain: our key, and no host-key prompts or user config."""
        return (f"-F /dev/null -i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                "-o LogLevel=ERROR")

    def ssh(self, host: str, command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", *self.options.split(), "-o", "BatchMode=yes", "-p", str(self.port), host, command],
                              capture_output=True, text=True, timeout=20)


@contextmanager
def running_sshd(tmp: Path):
    sshd = program("sshd", "openssh-server", "/usr/sbin")
    program("ssh", "openssh-client")
    keygen = program("ssh-keygen", "openssh-client")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "user_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
    shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
    port = free_port()
    (tmp / "sshd_config").write_text("\n".join([
        f"Port {port}", *(f"ListenAddress {h}" for h in HOSTS), f"HostKey {tmp / 'host_key'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}", f"PidFile {tmp / 'sshd.pid'}",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no", "LogLevel ERROR", "",
    ]))
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    log = tmp / "sshd.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(tmp / "sshd_config")], stdout=out, stderr=out)
    try:
        server = Sshd(port, tmp / "user_key")
        wait_until(lambda: proc.poll() is not None or all(_accepts(h, port) for h in HOSTS), 10, "sshd", log)
        if proc.poll() is not None:
            pytest.skip(f"sshd would not start: {log.read_text()[-1000:]}")
        check = server.ssh(HOSTS[1], "true")
        if check.returncode != 0:
            pytest.skip(f"cannot log in to the test sshd: {check.stderr.strip()} {log.read_text()[-500:]}")
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def running_slurm(tmp: Path):
    """A two-node Slurm cluster on this machine; yields the environment its clients need."""
    munged = program("munged", "munge", "/usr/sbin")
    slurmctld = program("slurmctld", "slurm-wlm", "/usr/sbin")
    slurmd = program("slurmd", "slurm-wlm", "/usr/sbin")
    program("salloc", "slurm-client")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs slurmd, which needs root")
    for folder in ("munge", "state", "spool/n1", "spool/n2", "log"):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    os.chmod(tmp / "munge", 0o700)
    (tmp / "munge" / "munge.key").write_bytes(os.urandom(1024))
    os.chmod(tmp / "munge" / "munge.key", 0o600)
    socket_path = tmp / "munge" / "sock"
    ctld_port, node_ports = free_port(), [free_port(), free_port()]
    conf = tmp / "slurm.conf"
    conf.write_text(SLURM_CONF.format(tmp=tmp, socket=socket_path, ctld_port=ctld_port, n1=node_ports[0], n2=node_ports[1]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        procs.append(subprocess.Popen(
            [munged, "-F", "-f", f"--socket={socket_path}", f"--key-file={tmp / 'munge' / 'munge.key'}",
             f"--pid-file={tmp / 'munge' / 'pid'}", f"--log-file={tmp / 'munge' / 'log'}", f"--seed-file={tmp / 'munge' / 'seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(socket_path.exists, 10, "munged", tmp / "munge" / "log")
        procs.append(subprocess.Popen([slurmctld, "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for node in ("n1", "n2"):
            procs.append(subprocess.Popen([slurmd, "-D", "-N", node, "-f", str(conf)], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            return sorted(out.stdout.split()) == ["idle", "idle", "n1", "n2"]

        wait_until(idle, 30, "the test Slurm cluster (slurmctld + 2 slurmd)", tmp / "log" / "slurmctld.log")
        yield env
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


SLURM_CONF = """\
ClusterName=sdtrain-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.%n.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=5
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.2 Port={n2} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
