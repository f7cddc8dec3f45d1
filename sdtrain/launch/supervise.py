"""Run the node agents, watch them, and tear everything down on failure or on a signal.

Guarantees the launcher gives:
- fail-fast: when any node agent exits non-zero (one of its workers died), the others are
  told to stop, and anything still alive 10 s later is killed;
- SIGINT/SIGTERM to the launcher reach every node agent, which stops its workers;
- no process of the job outlives the launcher: every descendant seen while the job ran is
  remembered (by pid and start time) and killed at the end if still alive. Nothing else
  is touched.

For remote nodes (ssh, pdsh, srun, mpirun) the commands run here are the runners; how a
node is asked to stop depends on the runner (runners.STOP_BY), and each node's stderr is
read here: failure reports and files sent back are picked out of it (the run directory
need not be shared), everything else is echoed with the node's name in front. Only a line
that starts with a marker is taken for a report or a file (the node agent writes those on a
channel of its own, channel.py), and only for that node: the plan says which node each
command starts, and a node's report or file that names another node (or another's ranks)
is refused with a note. A line that does not parse is echoed with a note, one
longer than MAX_LINE_BYTES is dropped with a note without ever being held whole; a reader
that fails anyway stops the job, saying why (a launcher that stopped reading a node would
otherwise wait for it forever).
"""

from __future__ import annotations

import collections
import ctypes
import json
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sdtrain.launch.collect import FILE_PREFIX, WHOLE_JOB, FileReceiver, Sender, senders
from sdtrain.launch.failures import REPORT_PREFIX, checked_report

TEARDOWN_GRACE_S = 10.0
REPORT_GRACE_S = 3.0  # after a node fails, how long the others have to report before they are stopped
POLL_S = 0.2
TAIL_LINES = 20
MAX_LINE_BYTES = 4 * 2**20  # far above a file chunk line or a node's failure report (node.py clips its texts)


@dataclass
class JobOutcome:
    exit_codes: list[int | None]
    interrupted: signal.Signals | None
    wall_s: float
    reports: list[dict] = field(default_factory=list)  # failure reports read from the nodes' stderr
    stderr_tails: list[list[str]] = field(default_factory=list)  # last stderr lines of each remote command
    failed_first: list[int] = field(default_factory=list)  # commands that failed before any was asked to stop
    errors: list[str] = field(default_factory=list)  # why the launcher itself stopped the job

    @property
    def ok(self) -> bool:
        return self.interrupted is None and not self.errors and all(code == 0 for code in self.exit_codes)


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher is killed outright (SIGKILL, OOM),
    the kernel sends the node agent (or its runner) SIGTERM, and it stops its workers."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class Supervisor:
    def __init__(self, commands: list[list[str]], env: dict[str, str] | None = None,
                 labels: list[str] | None = None, stop_by: str = "signal", run_dir: Path | None = None,
                 on_preempt=None, nodes=None):
        """`labels` (one per command) marks the commands as remote runners whose stderr is read.
        `nodes` (the plan's, one per command, needed for several remote ones): what each may
        report and send back; without them a single command is the whole job.
        `on_preempt` (checkpoint.on_preempt): called on the first SIGTERM/SIGUSR1 instead of
        stopping the job, which then ends at a step boundary by itself; another signal stops it."""
        if nodes is None and labels is not None and len(commands) > 1:
            raise ValueError("several remote nodes: pass the plan's nodes, which say what each may report and send")
        self.senders: list[Sender] = senders(nodes) if nodes is not None else [WHOLE_JOB] * len(commands)
        self.on_preempt = on_preempt
        self.preempting = False
        self.commands = commands
        self.env = env
        self.labels = labels
        self.stop_by = stop_by
        self.receiver = FileReceiver(run_dir) if run_dir is not None else None
        self.receiving = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.reports: list[dict] = []
        self.reported: list[int] = []  # commands whose node sent its failure report: it is stopping already
        self.tails: list[collections.deque] = []
        self.seen: dict[int, psutil.Process] = {}
        self.interrupted: signal.Signals | None = None
        self.failed_first: list[int] = []
        self.errors: list[str] = []

    def run(self) -> JobOutcome:
        start = time.monotonic()
        caught = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGUSR1,) if self.on_preempt else ())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in caught}
        try:
            for index, argv in enumerate(self.commands):
                self.procs.append(self._start(index, argv))
            self._wait()
        finally:
            self._teardown()
            for reader in self.readers:
                reader.join(timeout=5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return JobOutcome([p.poll() for p in self.procs], self.interrupted, time.monotonic() - start,
                          list(self.reports), [list(t) for t in self.tails], self.failed_first, list(self.errors))

    def _start(self, index: int, argv: list[str]) -> subprocess.Popen:
        # Own session: the terminal's Ctrl-C reaches the launcher only, which forwards it.
        if self.labels is None:
            return subprocess.Popen(argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        # Remote: never let a runner read the terminal; ssh keeps an open stdin as the stop line.
        stdin = subprocess.PIPE if self.stop_by == "close-stdin" else subprocess.DEVNULL
        proc = subprocess.Popen(argv, env=self.env, stdin=stdin, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=_die_with_parent)
        tail = collections.deque(maxlen=TAIL_LINES)
        self.tails.append(tail)
        reader = threading.Thread(target=self._read_stderr, args=(index, proc, tail), daemon=True)
        reader.start()
        self.readers.append(reader)
        return proc

    def _read_stderr(self, index: int, proc: subprocess.Popen, tail: collections.deque) -> None:
        try:
            for raw in bounded_lines(proc.stderr, MAX_LINE_BYTES):
                if raw is None:
                    self._echo(index, f"(sdtrain: a line longer than {MAX_LINE_BYTES // 2**20} MiB: dropped)")
                    continue
                self._read_line(index, raw.decode(errors="replace").rstrip("\n"), tail)
        except Exception as exc:  # whatever it is, the job must not wait for a reader that is gone
            self.errors.append(f"the launcher could not read the output of {self.labels[index]}: "
                               f"{type(exc).__name__}: {exc}")

    def _read_line(self, index: int, line: str, tail: collections.deque) -> None:
        sender = self.senders[index]
        if line.startswith(REPORT_PREFIX):
            try:
                report = checked_report(json.loads(line[len(REPORT_PREFIX):]))
                foreign = [f["rank"] for f in report["failures"] if f["rank"] not in sender.ranks]
                if report["node_rank"] != sender.node_rank or foreign:  # the root cause is never another node's word
                    raise ValueError(f"it speaks for node {report['node_rank']}" + (f", rank {foreign[0]}" if foreign else "")
                                     + f", and came from {sender.describe()}")
                self.reports.append(report)
                self.reported.append(index)  # a list: read while reader threads append
                return
            except (ValueError, RecursionError) as exc:
                self._echo(index, f"(sdtrain: a failure report line that cannot be used, {exc}; shown as it came)")
        if self.receiver is not None and line.startswith(FILE_PREFIX):
            with self.receiving:  # one node's line at a time: the notes taken are this line's, not another node's
                taken = self.receiver.feed(line, sender)
                notes = self.receiver.notes[:]
                self.receiver.notes.clear()
            for note in notes:
                self._echo(index, f"(sdtrain: a file sent back: {note})")
            if taken:
                return
        tail.append(line)
        self._echo(index, line)

    def _echo(self, index: int, line: str) -> None:
        try:
            sys.stderr.write(f"[{self.labels[index]}] {line}\n")  # one write: two nodes' lines never merge
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def _on_signal(self, signum, frame) -> None:
        if self.on_preempt is not None and signum != signal.SIGINT and not self.preempting:
            self.preempting = True
            self.on_preempt(signal.Signals(signum))
            return
        self.interrupted = signal.Signals(signum)

    def _wait(self) -> None:
        first_failure = None
        while True:
            self._remember_descendants()
            codes = [p.poll() for p in self.procs]
            # A failure report is the earliest sign: runners such as mpirun take seconds to
            # exit after their node agent did.
            self.failed_first = sorted({i for i, code in enumerate(codes) if code not in (None, 0)} | set(self.reported[:]))
            if self.interrupted or self.errors:
                return
            if self.failed_first:
                # The first report is often a symptom (a dead rank's peers fail in the next
                # collective, on their node); the node whose rank died may report a moment
                # later. Asking every node to stop at once would cut its report off, and the
                # root cause with it: the others get REPORT_GRACE_S to report or exit.
                first_failure = first_failure or time.monotonic()
                settled = all(code is not None or i in self.reported for i, code in enumerate(codes))
                if settled or time.monotonic() - first_failure >= REPORT_GRACE_S:
                    return
            elif all(code == 0 for code in codes):
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
        """Ask every node to stop, then kill whatever of the job is left here."""
        self._remember_descendants()
        sig = signal.SIGINT if self.interrupted == signal.SIGINT else signal.SIGTERM
        for index, proc in enumerate(self.procs):
            # A node that reported its failure is stopping on its own; signalling its runner
            # in the middle of that only adds noise (OpenMPI's mpirun even crashes).
            if proc.poll() is None and index not in self.reported:
                self._ask_to_stop(proc, sig)
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

    def _ask_to_stop(self, proc: subprocess.Popen, sig: signal.Signals) -> None:
        if self.stop_by == "close-stdin" and proc.stdin is not None:
            proc.stdin.close()  # ssh carries the end of file to the node agent, then waits for it
            return
        family = []  # found before the signal: once pdsh is gone its ssh has another parent
        if self.stop_by == "signal-tree":
            family = [p for p in self.seen.values() if p.pid != proc.pid and _descends_from(p, proc.pid)]
        proc.send_signal(sig)
        for p in family:
            try:
                p.send_signal(sig)  # psutil checks pid and start time
            except psutil.NoSuchProcess:
                pass


def bounded_lines(stream, limit: int):
    """The lines of a binary stream; None in place of one longer than `limit` bytes, which
    is read past in pieces, never held whole (a node once sent a 300 MB line)."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(limit)
        yield None


def _descends_from(p: psutil.Process, ancestor: int) -> bool:
    try:
        return _alive(p) and any(parent.pid == ancestor for parent in p.parents())
    except psutil.NoSuchProcess:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
