"""A record of the collectives this process entered and completed, for hang diagnosis.

When a job hangs, the question is which collective each rank is in, and which rank never
came: NCCL's flight recorder answers it on GPUs, nothing does on gloo. So each worker keeps
its own record, on every backend: a ring of the last collectives (sequence number, operation,
group, bytes, when entered, when completed), the ones still open kept apart.

The record is taken where the calls go through: the torch.distributed functions are wrapped
once, at worker start, so every collective sdtrain issues (strategies, trainer, checkpoints,
and any added later) is counted without a line in those files. A synchronous call completes
when it returns (on NCCL: when it is enqueued; the flight recorder has the GPU side); an
asynchronous one when its work's wait() returns.

The per-group sequence number is what makes ranks comparable: every member of a group issues
that group's collectives in the same order, so "rank 0 is in all_reduce #12 on [0, 1], rank 1
entered only #11 there" names the rank that never came.
"""

from __future__ import annotations

import collections
import functools
import threading
import time

import torch
import torch.distributed as dist

KEPT = 32  # collectives kept per rank: enough to see the pattern before a hang
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "all_gather_object", "gather_object", "broadcast_object_list",
               "scatter_object_list")
POINT_TO_POINT = ("send", "recv", "isend", "irecv")


class CollectiveLog:
    def __init__(self):
        self.lock = threading.Lock()
        self.recent: collections.deque = collections.deque(maxlen=KEPT)
        self.open: dict[int, dict] = {}  # seq -> entry, entered and not yet completed
        self.seq = 0
        self.group_seq: collections.Counter = collections.Counter()
        self.completed = 0
        self.changed_at = time.time()  # the last collective completed: the watchdog's sign of life
        self.groups: dict[int, tuple[str, list[int]]] = {}

    def enter(self, op: str, group, tensors, peer: int | None = None) -> dict:
        if peer is None:
            name, ranks = self._describe(group)
        else:  # a direction between two ranks is a group of its own: both ends count it alike
            ranks = [dist.get_rank(), peer] if "send" in op else [peer, dist.get_rank()]
            name = f"p2p {ranks[0]}->{ranks[1]}"
        with self.lock:
            self.seq += 1
            self.group_seq[name] += 1
            entry = {"seq": self.seq, "op": op, "group": name, "ranks": ranks, "group_seq": self.group_seq[name],
                     "bytes": _bytes(tensors), "entered": time.time(), "completed": None}
            if peer is not None:
                entry["peer"] = peer
            self.open[self.seq] = entry
            self.recent.append(entry)
        return entry

    def complete(self, entry: dict) -> None:
        with self.lock:
            if entry["completed"] is None:
                entry["completed"] = self.changed_at = time.time()
                self.completed += 1
                self.open.pop(entry["seq"], None)

    def snapshot(self) -> dict:
        with self.lock:
            recent = [dict(e) for e in self.recent]
            oldest = recent[0]["seq"] if recent else 0
            still_open = [dict(e) for seq, e in sorted(self.open.items()) if seq < oldest]
            return {"completed": self.completed, "changed_at": self.changed_at, "recent": still_open + recent}

    def _describe(self, group) -> tuple[str, list[int]]:
        group = group if group is not None else dist.group.WORLD
        known = self.groups.get(id(group))
        if known is None:
            try:
                ranks = dist.get_process_group_ranks(group)
            except (RuntimeError, ValueError):
                ranks = []
            desc = getattr(group, "group_desc", "") or ""
            name = "world" if group is dist.group.WORLD else desc.removeprefix("mesh_") if desc.startswith("mesh_") else ""
            known = self.groups[id(group)] = (f"{name}{ranks}" if name else str(ranks), ranks)
        return known


class RecordedWork:
    """An async op's work: completed in the log when its future is done (the backend's own
    word, however the work is waited for: DDP hands the future to autograd), or else when
    wait() returns or is_completed() says so."""

    def __init__(self, work, entry: dict, log: CollectiveLog):
        self._work, self._entry, self._log = work, entry, log
        try:
            work.get_future().add_done_callback(lambda _: log.complete(entry))
        except Exception:  # noqa: BLE001 - not every backend and op has a future (gloo's send/recv)
            pass

    def wait(self, *args, **kwargs):
        result = self._work.wait(*args, **kwargs)
        self._log.complete(self._entry)
        return result

    def is_completed(self) -> bool:
        done = self._work.is_completed()
        if done:
            self._log.complete(self._entry)
        return done

    def __getattr__(self, name):
        return getattr(self._work, name)


LOG = CollectiveLog()


def install() -> CollectiveLog:
    """Wrap torch.distributed's collectives (once per process) and return the log."""
    if getattr(dist, "_sdtrain_recorded", False):
        return LOG
    for name in COLLECTIVES + POINT_TO_POINT:
        if hasattr(dist, name):
            setattr(dist, name, _recorded(name, getattr(dist, name)))
    dist.batch_isend_irecv = _recorded_batch(dist.batch_isend_irecv)
    dist._sdtrain_recorded = True
    return LOG


def _recorded(op: str, call):
    @functools.wraps(call)
    def recorded(*args, **kwargs):
        group = kwargs.get("group") or next((a for a in args[1:] if isinstance(a, dist.ProcessGroup)), None)
        entry = LOG.enter(op, group, args[:2], _peer(op, args, kwargs))
        work = call(*args, **kwargs)
        if work is not None and hasattr(work, "wait"):
            return RecordedWork(work, entry, LOG)
        LOG.complete(entry)
        return work
    return recorded


def _recorded_batch(call):
    @functools.wraps(call)
    def recorded(p2p_ops):
        entries = [LOG.enter(getattr(o.op, "__name__", "p2p"), o.group, [o.tensor], o.peer) for o in p2p_ops]
        works = call(p2p_ops)
        if len(works) == len(entries):
            return [RecordedWork(w, e, LOG) for w, e in zip(works, entries)]
        return works
    return recorded


def _peer(op: str, args, kwargs) -> int | None:
    if op not in POINT_TO_POINT:
        return None
    key = "dst" if "send" in op else "src"
    peer = kwargs.get(key, args[1] if len(args) > 1 else None)
    return peer if isinstance(peer, int) else None


def _bytes(values) -> int | None:
    total, seen = 0, False
    for value in values:
        for tensor in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
                seen = True
    return total if seen else None
