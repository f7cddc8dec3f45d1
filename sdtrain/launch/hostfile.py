"""DeepSpeed-compatible hostfiles and resource filters.

A hostfile lists `HOST slots=N` lines; `#` starts a comment, blank lines are ignored, and
file order is rank order. The filters follow DeepSpeed's launcher so that existing files
and commands behave the same:

- `--include` / `--exclude` take `HOST[:SLOT,SLOT...][@HOST...]`: include keeps only the
  named hosts (all their slots, or the listed ones); exclude drops the named slots, or the
  whole host when no slot is named. They are mutually exclusive.
- `--num-nodes N` keeps the first N hosts, `--num-gpus N` the first N slots of each host;
  neither goes together with include/exclude.

Where DeepSpeed would carry on with a surprise (a slot count past the hostfile's, a filter
that leaves nothing), these refuse with an error that names the line or the filter.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

from sdtrain.errors import UserInputError, excerpt, printable
from sdtrain.user_files import read_text

# host -> the local slot (device) ids its workers use, in local-rank order; insertion order is rank order
Resources = dict[str, list[int]]

_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S*)$")
# A host name reaches ssh, pdsh, srun and mpirun as an argument: letters, digits, dots,
# dashes and underscores only, never a leading dash (an option to them) and none of the
# characters of pdsh's and Slurm's host-list syntax (`,`, `[`, `]`) or our filters' (`@`, `:`).
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
MAX_SLOTS = 1024  # per host; a slot is a device
MAX_HOSTS = 65_536  # in a hostfile or a Slurm host list: more nodes than the largest machines have
MAX_RANGE_DIGITS = 9  # in a host list's [01-16]
MAX_HOSTFILE_BYTES = 1 << 20  # a line per host: tens of thousands of hosts


def check_host(host: str, where: str) -> str:
    if len(host) > 253 or not _HOST.match(host):
        raise HostfileError(
            f"{where}: host name {excerpt(host)} is not a plain host name or address (letters, digits, '.', "
            "'-', '_', not starting with '-'); use the name ssh knows it by, or an alias from ~/.ssh/config"
        )
    return host


class HostfileError(UserInputError):
    pass


def read_hostfile(path: str | Path) -> dict[str, int]:
    text = read_text(path, "hostfile", MAX_HOSTFILE_BYTES, "text", HostfileError)  # a FIFO is refused, not waited on
    return parse_hostfile(text, printable(path))


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """host -> slot count, in file order."""
    hosts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}: {excerpt(raw.strip())}"
        match = _LINE.match(line)
        if not match:
            raise HostfileError(f"{where}: expected 'HOST slots=N' (e.g. 'worker-1 slots=8')")
        host, slots = check_host(match["host"], where), match["slots"]
        if not (slots.isascii() and slots.isdigit() and len(slots) <= 4) or not 1 <= int(slots) <= MAX_SLOTS:
            raise HostfileError(f"{where}: slots must be an integer from 1 to {MAX_SLOTS}, got {excerpt(slots)}")
        if host in hosts:
            raise HostfileError(f"{where}: host {host} is already listed on line {first_seen[host]}")
        if len(hosts) == MAX_HOSTS:  # checked as it reads: the plan, commands and checks grow with each host
            raise HostfileError(f"{where}: host {MAX_HOSTS + 1:,}; a job runs on at most {MAX_HOSTS:,} hosts "
                                "(as a Slurm host list does)")
        hosts[host], first_seen[host] = int(slots), number
    if not hosts:
        raise HostfileError(f"{source} lists no hosts: add lines like 'worker-1 slots=8'")
    return hosts


def parse_filter(spec: str, flag: str) -> dict[str, list[int]]:
    """`a@b:0,2` -> {"a": [], "b": [0, 2]} (an empty list means every slot)."""
    nodes: dict[str, list[int]] = {}
    for part in spec.split("@"):
        host, _, slot_text = part.partition(":")
        if not host:
            raise HostfileError(f"{flag} {excerpt(spec)}: empty host name in {excerpt(part)}; the form is HOST[:SLOT,SLOT][@HOST...]")
        slots = nodes.setdefault(host, [])
        if ":" in part:
            for slot in slot_text.split(","):
                if not (slot.strip().isascii() and slot.strip().isdigit() and len(slot.strip()) <= 4):
                    raise HostfileError(f"{flag} {excerpt(spec)}: slot {excerpt(slot)} of host {printable(host)} is not "
                                        f"a non-negative integer below {MAX_SLOTS}")
                slots.append(int(slot))
    # dict.fromkeys: duplicates dropped in one pass, first mention first (a filter may repeat a slot)
    return {host: list(dict.fromkeys(slots)) for host, slots in nodes.items()}


def select_resources(hosts: dict[str, int], include: str = "", exclude: str = "",
                     num_nodes: int | None = None, num_gpus: int | None = None) -> Resources:
    """Apply DeepSpeed's filters to a hostfile: host -> slots to use, in hostfile order."""
    if include and exclude:
        raise HostfileError("--include and --exclude are mutually exclusive: give one of them")
    if (include or exclude) and (num_nodes is not None or num_gpus is not None):
        raise HostfileError("--num-nodes / --num-gpus do not go with --include / --exclude: give one kind of filter")
    pool: Resources = {host: list(range(count)) for host, count in hosts.items()}
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    if spec:
        pool = _filter(pool, parse_filter(spec, flag), flag, spec, keep=bool(include))
    if num_nodes is not None:
        if num_nodes < 1 or num_nodes > len(pool):
            raise HostfileError(f"--num-nodes {num_nodes}: the hostfile has {len(pool)} host(s); give 1..{len(pool)}")
        pool = dict(list(pool.items())[:num_nodes])
    if num_gpus is not None:
        short = [f"{host} ({len(slots)})" for host, slots in pool.items() if len(slots) < num_gpus]
        if num_gpus < 1 or short:
            raise HostfileError(f"--num-gpus {num_gpus}: needs 1..slots per host; too few slots on {some(short) or 'none'}")
        pool = {host: slots[:num_gpus] for host, slots in pool.items()}
    return pool


def _filter(pool: Resources, wanted: dict[str, list[int]], flag: str, spec: str, keep: bool) -> Resources:
    for host, slots in wanted.items():
        if host not in pool:
            raise HostfileError(f"{flag} {excerpt(spec)}: host {printable(host)} is not in the hostfile "
                                f"(hosts: {some(pool)})")
        have = set(pool[host])
        unknown = [s for s in slots if s not in have]
        if unknown:
            raise HostfileError(
                f"{flag} {excerpt(spec)}: host {printable(host)} has slots {_span(pool[host])}, no slot {', '.join(map(str, unknown))}"
            )
    chosen: Resources = {}
    for host, slots in pool.items():  # hostfile order, whatever order the filter named them in
        named = wanted.get(host)
        if keep and named is not None:
            chosen[host] = sorted(named) or slots
        elif not keep and named is None:
            chosen[host] = slots
        elif not keep and named:
            chosen[host] = [s for s in slots if s not in named]
    chosen = {host: slots for host, slots in chosen.items() if slots}
    if not chosen:
        raise HostfileError(f"{flag} {excerpt(spec)} leaves no slot to run on")
    return chosen


def some(names, shown: int = 8) -> str:
    """The first few of many names, for a message that stays one line whatever the hostfile holds."""
    names = list(names)
    more = f" and {len(names) - shown:,} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _span(slots: list[int]) -> str:
    return f"{slots[0]}..{slots[-1]}" if len(slots) > 1 else str(slots[0])


def expand_hostlist(text: str, source: str = "host list") -> list[str]:
    """Slurm's compact host list (`gpu[01-03,7],login1`) -> names, in order; how many names it
    makes is counted before any is made, so `gpu[0-99999999]` is refused at once."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(_parse_item(text[start:i], text, source))
            start = i + 1
    total = sum(math.prod(len(numbers) for numbers in item[1::2]) for item in items)
    if total > MAX_HOSTS:
        raise HostfileError(f"{source} {excerpt(text)} names {total:,} hosts; a job runs on at most {MAX_HOSTS:,}")
    hosts = [
        "".join(choice)
        for item in items
        for choice in itertools.product(*[[part] if k % 2 == 0 else _names(part) for k, part in enumerate(item)])
    ]
    return [h for h in hosts if h]


def _parse_item(item: str, text: str, source: str) -> list:
    """`gpu[1-3]x[7]` -> ["gpu", Ranges, "x", Ranges, ""]: text and ranges alternate."""
    pieces: list = re.split(r"\[([^\]]*)\]", item)
    for k in range(1, len(pieces), 2):
        pieces[k] = _Ranges(pieces[k], text, source)
    return pieces


class _Ranges:
    """`01-03,7`: (low, high, digits) per part; len() counts the numbers without making them."""

    def __init__(self, spec: str, text: str, source: str):
        self.parts = []
        for part in spec.split(","):
            low, _, high = part.partition("-")
            high = high or low
            if not all(n.isascii() and n.isdigit() and len(n) <= MAX_RANGE_DIGITS for n in (low, high)) \
                    or int(high) < int(low):
                raise HostfileError(f"{source} {excerpt(text)}: {excerpt(part)} is not a range like 01-16 or a number "
                                    f"(of at most {MAX_RANGE_DIGITS} digits)")
            self.parts.append((int(low), int(high), len(low)))

    def __len__(self) -> int:
        return sum(high - low + 1 for low, high, _ in self.parts)


def _names(ranges: _Ranges) -> list[str]:
    return [f"{n:0{width}d}" for low, high, width in ranges.parts for n in range(low, high + 1)]
