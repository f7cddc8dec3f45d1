"""How many elements an offloaded optimizer steps at a time, without torch: the stepper cuts
its sub-groups by it (optimizer.py) and the estimate counts its buffers by it
(estimate/buffers.py)."""

from __future__ import annotations

# Sub-groups start at multiples of this many elements within each part the in-memory AdamW
# steps (larger than any vector width: the kernel's tail loop sees the same elements).
SUB_GROUP_ALIGN = 1024
FP32_BYTES = 4


def sub_group_numel(sub_group_mb: float) -> int:
    """Elements per sub-group: sub_group_mb MiB of fp32 master, a multiple of SUB_GROUP_ALIGN."""
    return max(SUB_GROUP_ALIGN, int(sub_group_mb * 2**20 / FP32_BYTES) // SUB_GROUP_ALIGN * SUB_GROUP_ALIGN)
