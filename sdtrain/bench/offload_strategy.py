"""Offload strategies of `sdtrain bench`: `zero<S>-nvme`, `zero<S>-cpu` (the optimizer state
offloaded at ZeRO stage S = 1, 2, 3) and `zero3-nvme-params`, `zero3-cpu-params` (the stage-3
weight shards too), each a real `sdtrain launch` of the recipe with those parallel.zero keys.
Their rows carry the step's exposed I/O wait and the read / write bandwidth offload achieved
(metrics.jsonl's offload_wait_s, offload_read_gbps, offload_write_gbps), beside the disk's own
bandwidth at nvme_path (disk.py): "-" where a run logged none.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

from sdtrain.errors import UserInputError

NAME = re.compile(r"zero([0-9])-(nvme|cpu)(-params)?")
SYNTAX = "zero<S>-nvme|cpu[-params], S = 1..3, -params at stage 3 (e.g. zero1-nvme, zero3-nvme-params)"
METRICS = ("offload_wait_s", "offload_read_gbps", "offload_write_gbps")


@dataclass(frozen=True)
class OffloadStrategy:
    name: str
    zero_stage: int
    device: str  # nvme | cpu
    params: bool  # the stage-3 weight shards too

    def overrides(self) -> list[str]:
        return [f"parallel.zero_stage={self.zero_stage}", f"parallel.zero.offload_optimizer={self.device}",
                f"parallel.zero.offload_params={self.device if self.params else 'none'}",
                "parallel.pipeline.stages=1", "parallel.tensor_parallel=1"]


def parse_offload_strategy(name: str) -> OffloadStrategy | None:
    """The offload strategy a name asks for, or None when it names none (plain zero<S>)."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    stage, device, params = int(match[1]), match[2], match[3] is not None
    if not 1 <= stage <= 3:
        raise UserInputError(f"--strategies {name}: offload goes with ZeRO stage 1, 2 or 3; write {SYNTAX}")
    if params and stage != 3:
        raise UserInputError(f"--strategies {name}: -params offloads stage 3's weight shards; write zero3-{device}-params "
                             f"or zero{stage}-{device}")
    return OffloadStrategy(name, stage, device, params)


def offload_numbers(rows: list[dict]) -> dict[str, float | None]:
    """Per logged interval after the first (warm-up): the mean exposed I/O wait per step and
    the median achieved bandwidths; None for what the run did not log."""
    found = {}
    for key in METRICS:
        values = [row[key] for row in rows if row.get(key) is not None]
        found[key] = None if not values else (statistics.mean(values) if key == "offload_wait_s"
                                              else statistics.median(values))
    return found
