"""The launcher's one diagnosis of a hang, from what every node's watchdog took (watchdog.py).

Per rank: where its main thread is (the innermost frame outside torch, file:line and
function), and the collective it waits in, if it waits in one. Then the likely culprit: a
rank of the group the others wait in that never entered that collective (its per-group
sequence number is behind theirs); failing that, the ranks that wait in no collective.
The full stacks and each rank's last collectives go to hang/rank<N>.txt in the run directory.
Whatever a node sent is data: a field missing or of the wrong kind is skipped, never trusted.
"""

from __future__ import annotations

import collections
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-fA-F]+)")
FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.+)$')
# Frames of the machinery between sdtrain's call and the wait: not where a rank "is".
PLUMBING = re.compile(r"/torch/|collective_log\.py$|/threading\.py$")
SAME_HANG_S = 60.0  # node reports this close to the newest are of the same hang


@dataclass
class RankState:
    rank: int
    node_rank: int | str = "?"
    host: str = "?"
    pid: int | str = "?"
    step: int | None = None
    stack: list[tuple[str, int, str]] = field(default_factory=list)  # main thread, innermost first
    stacks: str = ""
    collectives: list[dict] = field(default_factory=list)
    nccl: dict | None = None
    taken_at: float | None = None  # when its node's watchdog took the stacks

    @property
    def where(self) -> str:
        """The innermost frame of sdtrain's own code (what called into torch or a library), else
        the innermost one outside torch."""
        ours = [f for f in self.stack if "/sdtrain/" in f[0] and not PLUMBING.search(f[0])]
        others = [f for f in self.stack if not PLUMBING.search(f[0])]
        frame = (ours or others or self.stack or [None])[0]
        return f"{short_path(frame[0])}:{frame[1]} in {frame[2]}" if frame else "(no stack)"

    @property
    def waiting_in(self) -> dict | None:
        """The oldest collective this rank entered that never completed: nothing after it can
        finish first (a group's collectives complete in order), so that is what it waits for,
        whether in the call, a work's wait(), or autograd waiting for DDP's bucket."""
        still_open = [c for c in self.collectives if c.get("completed") is None]
        return min(still_open, key=_seq) if still_open else None

    def entered(self, group: str) -> int:
        """The last sequence number this rank entered on `group` (0: none it still remembers)."""
        return max((c.get("group_seq", 0) for c in self.collectives if c.get("group") == group), default=0)


def short_path(path: str) -> str:
    at = path.rfind("/sdtrain/")
    return path[at + 1:] if at >= 0 else path


def _seq(collective: dict) -> int:
    return collective.get("seq", 0) if isinstance(collective.get("seq"), int) else 0


def main_thread_stack(text: str, main_thread) -> list[tuple[str, int, str]]:
    """The frames of the main thread in a faulthandler dump, innermost first."""
    wanted = f"0x{main_thread:016x}" if isinstance(main_thread, int) else None
    threads, current = {}, None
    for line in text.splitlines():
        header = THREAD.match(line)
        if header:
            current = threads.setdefault(header.group(1).lower(), [])
            continue
        frame = FRAME.match(line)
        if frame and current is not None:
            current.append((frame.group(1), int(frame.group(2)), frame.group(3)))
    if wanted in threads:
        return threads[wanted]
    return next(iter(threads.values()), [])


def read_ranks(run_dir: Path) -> tuple[dict[int, RankState], list[dict]]:
    """Every rank of every node's hang report, and the reports themselves."""
    ranks, reports = {}, []
    for path in sorted((run_dir / "hang").glob("node*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or not isinstance(report.get("ranks"), dict):
            continue
        reports.append(report)
    newest = max((r["detected_at"] for r in reports if isinstance(r.get("detected_at"), (int, float))), default=0)
    # A node's report of an earlier attempt's hang (launch.max_restarts) is not this hang's.
    reports = [r for r in reports if not isinstance(r.get("detected_at"), (int, float)) or r["detected_at"] > newest - SAME_HANG_S]
    for report in reports:
        for key, beat in report["ranks"].items():
            if not (isinstance(beat, dict) and key.isdigit()):
                continue
            recent = beat.get("recent") if isinstance(beat.get("recent"), list) else []
            stacks = beat.get("stacks") if isinstance(beat.get("stacks"), str) else ""
            ranks[int(key)] = RankState(
                rank=int(key), node_rank=report.get("node_rank", "?"), host=str(beat.get("host", report.get("host", "?"))),
                pid=beat.get("pid", "?"), step=beat.get("step"), stack=main_thread_stack(stacks, beat.get("main_thread")),
                stacks=stacks, collectives=[c for c in recent if isinstance(c, dict)],
                nccl=beat.get("nccl") if isinstance(beat.get("nccl"), dict) else None,
                taken_at=report.get("detected_at") if isinstance(report.get("detected_at"), (int, float)) else None)
    return ranks, reports


def describe_collective(c: dict) -> str:
    size = f" ({c['bytes']:,} bytes)" if isinstance(c.get("bytes"), int) else ""
    return f"{c.get('op')} #{c.get('group_seq')} on {c.get('group')}{size}"


def diagnose(ranks: dict[int, RankState], reports: list[dict], world_size: int | None = None) -> tuple[str, list[str]]:
    """(one-line cause, the lines that explain it)."""
    waiting = {r: s.waiting_in for r, s in ranks.items() if s.waiting_in is not None}
    outside = sorted(r for r, s in ranks.items() if s.waiting_in is None)
    missing = sorted(set(range(world_size)) - set(ranks)) if world_size else []
    blocking, culprits, key = None, [], None
    if waiting:
        key = collections.Counter((c.get("group"), c.get("group_seq")) for c in waiting.values()).most_common(1)[0][0]
        blocking = next(c for c in waiting.values() if (c.get("group"), c.get("group_seq")) == key)
        members = [r for r in blocking.get("ranks", []) if isinstance(r, int)]
        culprits = [r for r in members if r not in ranks or ranks[r].entered(blocking["group"]) < blocking["group_seq"]]
    culprits = culprits or outside or missing
    timeout = next((r.get("timeout_s") for r in reports if r.get("timeout_s")), None)
    stalled = max((float(s) for r in reports for s in (r.get("stalled") or {}).values()
                   if isinstance(s, (int, float))), default=None)
    lines = [f"no progress for {stalled:.0f} s" if stalled is not None else "no progress"]
    lines[0] += f" (launch.hang_timeout_s {timeout:g})" if isinstance(timeout, (int, float)) else ""
    lines[0] += "; every rank's stack was taken before the job was stopped"
    for r in culprits:
        state = ranks.get(r)
        waiters = sorted(w for w, c in waiting.items() if (c.get("group"), c.get("group_seq")) == key)
        never = (f"never entered {describe_collective(blocking)}, which rank{'s' if len(waiters) > 1 else ''} "
                 f"{', '.join(map(str, waiters))} wait{'' if len(waiters) > 1 else 's'} in") if blocking else "waits in no collective"
        if state is None:
            lines.append(f"likely culprit: rank {r} {never}; it sent no stack (its node did not report)")
        else:
            lines.append(f"likely culprit: rank {r} (node {state.node_rank}, {state.host}, pid {state.pid}) {never}; "
                         f"it is at {state.where}" + (f", step {state.step}" if state.step is not None else ""))
    for r, state in sorted(ranks.items()):
        if r in waiting:
            c = waiting[r]
            since = (f", for {state.taken_at - c['entered']:.0f} s when its stack was taken"
                     if isinstance(c.get("entered"), (int, float)) and state.taken_at else "")
            what = f"waiting in {describe_collective(c)}{since}"
        else:
            done = [c for c in state.collectives if c.get("completed") is not None]
            last = max(done, key=_seq) if done else None
            what = "in no collective" + (f" (last completed: {describe_collective(last)})" if last else "")
        lines.append(f"rank {r}: {what}, at {state.where}" + (f", step {state.step}" if state.step is not None else ""))
    where = ranks[culprits[0]].where if culprits and culprits[0] in ranks else None
    cause = f"hang: rank{'s' if len(culprits) > 1 else ''} {', '.join(map(str, culprits)) or '?'}"
    cause += f" stuck at {where}" if where else " stuck"
    if blocking:
        cause += f" while the others wait in {blocking.get('op')} #{blocking.get('group_seq')} on {blocking.get('group')}"
    return cause, lines


def write_stacks(run_dir: Path, ranks: dict[int, RankState], cause: str, lines: list[str]) -> None:
    """hang/diagnosis.txt, and hang/rank<N>.txt: the full stacks, the last collectives, NCCL's."""
    folder = run_dir / "hang"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "diagnosis.txt").write_text("\n".join([cause, *lines]) + "\n")
    for r, state in ranks.items():
        parts = [f"rank {r} (node {state.node_rank}, {state.host}, pid {state.pid}), step {state.step}", "",
                 "stacks (most recent call first):", state.stacks.rstrip() or "(none: the rank did not answer)", "",
                 "last collectives (seq, per-group seq, op, group, bytes, entered, completed):"]
        for c in sorted(state.collectives, key=_seq):
            parts.append(f"  {c.get('seq')}  #{c.get('group_seq')} {c.get('op')} {c.get('group')} {c.get('bytes')} "
                         f"{_clock(c.get('entered'))} {_clock(c.get('completed')) if c.get('completed') else 'OPEN'}")
        if state.nccl:
            parts += ["", "NCCL flight recorder:", json.dumps(state.nccl, indent=1)]
        (folder / f"rank{r}.txt").write_text("\n".join(parts) + "\n")


def _clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}" if isinstance(t, (int, float)) else "?"


def hang_diagnosis(run_dir: Path, world_size: int | None = None) -> tuple[str, list[str]] | None:
    """The diagnosis of the hang the nodes reported (written to hang/ too), or None."""
    ranks, reports = read_ranks(run_dir)
    if not reports:
        return None
    cause, lines = diagnose(ranks, reports, world_size)
    try:
        write_stacks(run_dir, ranks, cause, lines)
    except OSError:
        pass
    return cause, lines
