"""Which DeepSpeed NVMe-offload peers (`--peers deepspeed-nvme`, peer_deepspeed_nvme.py) an
offload bench runs: one per zero3-nvme / zero3-nvme-params row, at the same workers.

DeepSpeed moves state to NVMe at ZeRO-3 only (ZeRO-Infinity): its stage 1/2 optimizer takes
`device: nvme` as cpu offload, so a zero1-nvme or zero2-nvme row has no NVMe peer, and a note
says so rather than compare it with host-memory offload. cpu rows have none either, and on CPU
neither has zero3-nvme-params: DeepSpeed's weight offload fails on its CPU accelerator.
"""

from __future__ import annotations

import importlib.util

from sdtrain.bench.offload_strategy import OffloadStrategy

PEER = "deepspeed-nvme"
# DeepSpeed 0.19.8 on its CPU accelerator, bench-20m at 2 ranks: under fp32 the swapped-in weights
# come back bf16 ("expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16" in
# LinearFunctionForZeroStage3); under bf16 the first gather runs out of swap buffers ("Not enough
# buffers 0 for swapping 1") and with 64 of them swaps a weight in twice ("param 84 already
# assigned swap buffer id 50"). On a GPU it runs.
PARAMS_ON_CPU = ("DeepSpeed's offload_param nvme does not run on its CPU accelerator (0.19.8: fp32 weights swap "
                 "back as bf16; bf16 runs out of, or double-assigns, swap buffers)")


def nvme_peers(peers: list[str], offloads: list[OffloadStrategy | None], notes: list[str],
               recipe) -> list[tuple[str, str, OffloadStrategy]]:
    """(row name, the peer's --option, the offload row it is compared with) per nvme row that
    DeepSpeed can run, where --peers asks for it; a note for each it cannot."""
    if PEER not in peers:
        return []
    if importlib.util.find_spec("deepspeed") is None:
        notes.append(f"{PEER}: deepspeed not installed, skipped (DS_BUILD_OPS=0 pip install deepspeed "
                     "--no-build-isolation; its async_io op needs libaio)")
        return []
    import torch

    on_cuda = torch.cuda.is_available() and recipe.launch.backend != "gloo"  # where the peer trains (peer_common)
    return peer_rows(offloads, notes, on_cuda)


def peer_rows(offloads: list[OffloadStrategy | None], notes: list[str],
              on_cuda: bool) -> list[tuple[str, str, OffloadStrategy]]:
    """nvme_peers' rows whatever is installed: one per zero3 nvme row (the -params one on a GPU
    only), a note per other nvme row."""
    out = []
    for offload in dict.fromkeys(filter(None, offloads)):
        if offload.device != "nvme":
            continue
        if offload.zero_stage != 3 or (offload.params and not on_cuda):
            why = (f"DeepSpeed offloads to NVMe at ZeRO-3 only (at stage {offload.zero_stage} it treats nvme as cpu)"
                   if offload.zero_stage != 3 else PARAMS_ON_CPU)
            note = f"{PEER}: no peer for {offload.name}: {why}"
            if note not in notes:
                notes.append(note)
            continue
        option = "params" if offload.params else "optimizer"
        out.append((f"{PEER}-z3" + ("-params" if offload.params else ""), option, offload))
    if not out and not any(PEER in note for note in notes):
        notes.append(f"{PEER}: no zero3-nvme or zero3-nvme-params strategy to compare with, skipped")
    return out
