"""What `sdtrain bench comm` measures, and the nccl-tests arithmetic, without torch.

Sizes are the bytes of each rank's buffer as nccl-tests count them: for all_gather the
gathered output, for reduce_scatter the input that is scattered, for the others the one
buffer. Algorithm bandwidth is size / time; bus bandwidth scales it by what each rank must
send over its links for that collective, so that every op reads against the hardware's
link bandwidth (nccl-tests' doc/PERFORMANCE.md): 2(n-1)/n for all_reduce, (n-1)/n for
all_gather, reduce_scatter and all_to_all, 1 for broadcast and send_recv.
"""

from __future__ import annotations

import re

from sdtrain.errors import UserInputError

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")
ELEMENT_BYTES = 4  # float32: integer-valued patterns stay exact, so every result is checked exactly
MAX_SIZES = 64
MAX_BYTES = 16 * 2**30
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
# Bytes a rank holds at its peak, in buffers of the measured size: all_reduce builds its data,
# a copy to restore it, the expected result and their int64 index patterns (6 measured on CPU),
# and gloo reduces through a working copy of its own.
PEAK_BUFFERS = 7


def bus_factor(op: str, world: int) -> float:
    if op == "all_reduce":
        return 2 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (world - 1) / world
    return 1.0


def bandwidths(op: str, size_bytes: int, seconds: float, world: int) -> tuple[float, float]:
    """(algorithm, bus) bandwidth in GB/s (10^9 bytes, as nccl-tests)."""
    algbw = size_bytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, world)


def buffer_elements(size_bytes: int, world: int) -> int:
    """Elements per buffer: the size rounded down to whole float32 chunks, one per rank."""
    chunk = size_bytes // (ELEMENT_BYTES * world)
    return max(chunk, 1) * world


def parse_ops(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(OPS)
    unknown = [name for name in names if name not in OPS]
    if unknown or not names:
        raise UserInputError(f"--ops {text!r}: unknown op(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from all, {', '.join(OPS)}")
    return list(dict.fromkeys(names))


def parse_sizes(text: str) -> list[int]:
    """`1K,64M` or ranges `1K..1G` (x2 steps) and `1K..1G:4` (x4 steps); K/M/G are 2^10/2^20/2^30."""
    sizes: list[int] = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        first, dots, rest = part.partition("..")
        if not dots:
            sizes.append(parse_size(part))
            continue
        last, colon, step = rest.partition(":")
        low, high = parse_size(first), parse_size(last)
        factor = _factor(step, part) if colon else 2
        if high < low:
            raise UserInputError(f"--sizes {part!r}: the range ends below where it starts")
        size = low
        while size <= high:
            sizes.append(size)
            size *= factor
            if len(sizes) > MAX_SIZES:
                break
    if not sizes:
        raise UserInputError(f"--sizes {text!r}: give sizes like 1K,64M or a range 1K..1G")
    if len(sizes) > MAX_SIZES:
        raise UserInputError(f"--sizes {text!r}: more than {MAX_SIZES} sizes; use a larger step, e.g. 1K..1G:4")
    return sorted(set(sizes))


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)i?B?", text.strip(), flags=re.IGNORECASE)
    if not match:
        raise UserInputError(f"--sizes: {text!r} is not a size; write bytes with K, M or G, e.g. 1K, 64M, 1G")
    size = int(match.group(1)) * UNITS[match.group(2).upper()]
    if not 0 < size <= MAX_BYTES:
        raise UserInputError(f"--sizes: {text!r} must be between 1 byte and {MAX_BYTES // 2**30}G")
    return size


def check_memory(sizes: list[int], ranks: int, available_bytes: int, where: str = "this machine") -> None:
    """Refuse, before anything starts, sizes whose buffers `ranks` ranks cannot hold in `available_bytes`."""
    need = max(sizes) * PEAK_BUFFERS * ranks
    if need <= available_bytes:
        return
    fits = [size for size in (2**k for k in range(10, 35)) if size * PEAK_BUFFERS * ranks <= available_bytes]
    advice = f"use --sizes up to {format_size(fits[-1])}" if fits else "use fewer ranks (--nproc)"
    raise UserInputError(
        f"--sizes up to {format_size(max(sizes))}: {ranks} rank(s) on {where} hold about {PEAK_BUFFERS} buffers of that "
        f"size each, {need / 2**30:.1f} GiB, and {where} has {available_bytes / 2**30:.1f} GiB available; {advice}")


def _factor(text: str, part: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise UserInputError(f"--sizes {part!r}: the step after ':' is a whole factor of at least 2, e.g. 1K..1G:4")
    return int(text)


def format_size(size: int) -> str:
    for unit in ("G", "M", "K"):
        if size >= UNITS[unit] and size % UNITS[unit] == 0:
            return f"{size // UNITS[unit]}{unit}"
    return f"{size}B" if size < 1024 else f"{size / 1024:.1f}K"
