"""One layout of a job: every axis the planner chooses, and its short name.

The name is what `plan --explain` takes and what tables print: pp2-tp1-dp2-z3-mb4-ac0, with
-ep2 after dp where experts are split, -nvme after the ZeRO stage where the optimizer state
lives on disk, and the pipeline schedule last where it is not 1f1b (-gpipe, -interleaved2,
-zero_bubble). Parts left out take their defaults, so the short form of the issue parses.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from sdtrain.errors import UserInputError, excerpt

SCHEDULES = ("1f1b", "gpipe", "interleaved", "zero_bubble")
OFFLOADS = ("none", "nvme")
NAME_PATTERN = re.compile(
    r"pp(?P<pp>\d+)-tp(?P<tp>\d+)-dp(?P<dp>\d+)(?:-ep(?P<ep>\d+))?-z(?P<zero>[0-3])(?:-(?P<offload>nvme))?"
    r"-mb(?P<mb>\d+)-ac(?P<ac>[01])(?:-(?P<schedule>1f1b|gpipe|interleaved(?P<v>\d+)|zero_bubble))?")


@dataclass(frozen=True)
class Candidate:
    pp: int
    tp: int
    dp: int
    ep: int
    zero_stage: int
    offload: str  # none | nvme (the optimizer state: master weights and Adam moments)
    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool
    schedule: str  # none (no pipeline) | 1f1b | gpipe | interleaved | zero_bubble
    virtual_stages: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.tp * self.dp

    @property
    def name(self) -> str:
        parts = [f"pp{self.pp}", f"tp{self.tp}", f"dp{self.dp}"]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"z{self.zero_stage}")
        if self.offload != "none":
            parts.append(self.offload)
        parts += [f"mb{self.micro_batch_size}", f"ac{int(self.activation_checkpointing)}"]
        if self.schedule == "interleaved":
            parts.append(f"interleaved{self.virtual_stages}")
        elif self.schedule not in ("none", "1f1b"):
            parts.append(self.schedule)
        return "-".join(parts)

    def as_dict(self) -> dict:
        row = asdict(self)
        del row["virtual_stages"]
        return row


def parse_name(text: str, global_batch: int) -> Candidate:
    """A layout's name -> its candidate (the accumulation follows from the global batch)."""
    match = NAME_PATTERN.fullmatch(text.strip())
    if not match:
        raise UserInputError(f"--explain {excerpt(text)} is not a layout name; write it as the table does, "
                             "e.g. pp2-tp1-dp2-z3-mb4-ac0 (optional: -ep2 after dp, -nvme after z, -gpipe last)")
    g = match.groupdict()
    pp, tp, dp, mb = int(g["pp"]), int(g["tp"]), int(g["dp"]), int(g["mb"])
    if min(pp, tp, dp, mb) < 1:
        raise UserInputError(f"--explain {excerpt(text)}: every size must be at least 1")
    if global_batch % (mb * dp):
        raise UserInputError(f"--explain {excerpt(text)}: the global batch {global_batch} is not a multiple of "
                             f"micro-batch {mb} x dp {dp}; choose a micro-batch that divides {global_batch // dp}"
                             if global_batch % dp == 0 else
                             f"--explain {excerpt(text)}: dp {dp} does not divide the global batch {global_batch}")
    schedule = g["schedule"] or "1f1b"
    virtual = int(g["v"]) if g["v"] else 1
    if schedule.startswith("interleaved"):
        schedule = "interleaved"
    return Candidate(pp, tp, dp, int(g["ep"] or 1), int(g["zero"]), g["offload"] or "none", mb,
                     global_batch // (mb * dp), g["ac"] == "1", schedule if pp > 1 else "none", virtual)
