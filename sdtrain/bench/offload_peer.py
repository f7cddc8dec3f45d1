"""Which DeepSpeed NVMe-offload peers (`--peers deepspeed-nvme`, peer_deepspeed_nvme.py) an
offload bench runs: one per zero3-nvme / zero3-nvme-params row, at the same workers.

DeepSpeed moves state to NVMe at ZeRO-3 only (ZeRO-Infinity): its stage 1/2 optimizer takes
`device: nvme` as cpu offload, so a zero1-nvme or zero2-nvme row has no NVMe peer, and a note
says so rather than compare it with host-memory offload. cpu rows have none either.
"""

from __future__ import annotations

import importlib.util

from sdtrain.bench.offload_strategy import OffloadStrategy

PEER = "deepspeed-nvme"


def nvme_peers(peers: list[str], offloads: list[OffloadStrategy | None],
               notes: list[str]) -> list[tuple[str, str, OffloadStrategy]]:
    """(row name, the peer's --option, the offload row it is compared with) per nvme row that
    DeepSpeed can run, where --peers asks for it; a note for each it cannot."""
    if PEER not in peers:
        return []
    if importlib.util.find_spec("deepspeed") is None:
        notes.append(f"{PEER}: deepspeed not installed, skipped (DS_BUILD_OPS=0 pip install deepspeed "
                     "--no-build-isolation; its async_io op needs libaio)")
        return []
    return peer_rows(offloads, notes)


def peer_rows(offloads: list[OffloadStrategy | None], notes: list[str]) -> list[tuple[str, str, OffloadStrategy]]:
    """nvme_peers' rows whatever is installed: one per zero3 nvme row, a note per other nvme row."""
    out = []
    for offload in dict.fromkeys(filter(None, offloads)):
        if offload.device != "nvme":
            continue
        if offload.zero_stage != 3:
            note = (f"{PEER}: DeepSpeed offloads to NVMe at ZeRO-3 only (at stage {offload.zero_stage} it treats "
                    f"nvme as cpu), no peer for {offload.name}")
            if note not in notes:
                notes.append(note)
            continue
        option = "params" if offload.params else "optimizer"
        out.append((f"{PEER}-z3" + ("-params" if offload.params else ""), option, offload))
    if not out and not any(PEER in note for note in notes):
        notes.append(f"{PEER}: no zero3-nvme or zero3-nvme-params strategy to compare with, skipped")
    return out
