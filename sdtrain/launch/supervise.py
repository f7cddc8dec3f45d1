"""Run the node agents, watch them, and tear everything down on failure or on a signal.

Guarantees the launcher gives:
- fail-fast: when any node agent exits non-zero (one of its workers died), the others are
  told to stop, and anything still alive 10 s later is killed;
- SIGINT/SIGTERM to the launcher reach every node agent, which stops its workers;
- no process of the job outlives the launcher: every descendant seen while the job ran is
  remembered (by pid and start time) and killed at the end if still alive. Nothing else
  is touched.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time
from dataclasses import dataclass

import psutil

TEARDOWN_GRACE_S = 10.0
POLL_S = 0.2


@dataclass
class JobOutcome:
    exit_codes: list[int | None]
    interrupted: signal.Signals | None
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.interrupted is None and all(code == 0 for code in self.exit_codes)


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher is killed outright (SIGKILL, OOM),
    the kernel sends the node agent SIGTERM, and it stops its workers."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Supervisor:
    def __init__(self, commands: list[list[str]], env: dict[str, str] | None = None):
        self.commands = commands
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.seen: dict[int, psutil.Process] = {}
        self.interrupted: signal.Signals | None = None

    def run(self) -> JobOutcome:
        start = time.monotonic()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for argv in self.commands:
                # Own session: the terminal's Ctrl-C reaches the launcher only, which forwards it.
                self.procs.append(
                    subprocess.Popen(argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
                )
            self._wait()
        finally:
            self._teardown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return JobOutcome([p.poll() for p in self.procs], self.interrupted, time.monotonic() - start)

    def _on_signal(self, signum, frame) -> None:
        self.interrupted = signal.Signals(signum)

    def _wait(self) -> None:
        while True:
            self._remember_descendants()
            codes = [p.poll() for p in self.procs]
            if self.interrupted or any(code not in (None, 0) for code in codes):
                return
            if all(code == 0 for code in codes):
                return
            time.sleep(POLL_S)

    def _remember_descendants(self) -> None:
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                continue

    def _teardown(self) -> None:
        """Ask every node agent to stop, then kill whatever of the job is left."""
        self._remember_descendants()
        sig = signal.SIGINT if self.interrupted == signal.SIGINT else signal.SIGTERM
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        deadline = time.monotonic() + TEARDOWN_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            self._remember_descendants()
            time.sleep(POLL_S)
        leftovers = [p for p in self.seen.values() if _alive(p)]
        for p in leftovers:
            try:
                p.kill()  # psutil checks pid and start time: never a recycled pid
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        for proc in self.procs:
            if proc.poll() is None:
                proc.wait(timeout=5)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
