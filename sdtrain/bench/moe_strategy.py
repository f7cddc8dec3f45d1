"""Mixture-of-Experts strategies of `sdtrain bench`: `ep<N>[-zero<S>]` (ep1, ep2, ep4-zero1), each
a real `sdtrain launch` of an MoE recipe with the experts split over N ranks of each
data-parallel group, at every worker count N divides; and its peer, DeepSpeed's MoE layer at
the same expert-parallel size and ZeRO stage (peer_deepspeed_moe.py).

Their rows carry the share of step time spent in the all-to-all (dispatch and combine, forward
and backward: metrics.jsonl's `moe_all_to_all_share`); the peer times DeepSpeed's own calls
the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdtrain.errors import UserInputError

NAME = re.compile(r"ep(\d+)(?:-zero([0-3]))?")
SYNTAX = "ep<N>[-zero<S>], N experts' ranks (e.g. ep1, ep2, ep4-zero1)"
DEEPSPEED_MOE_ZERO = (0, 1, 2)  # DeepSpeed refuses MoE with ZeRO-3


@dataclass(frozen=True)
class ExpertStrategy:
    name: str
    ep: int
    zero_stage: int

    def overrides(self) -> list[str]:
        return [f"parallel.expert_parallel={self.ep}", f"parallel.zero_stage={self.zero_stage}",
                "parallel.pipeline.stages=1"]

    @property
    def peer_name(self) -> str:
        return f"deepspeed-moe-ep{self.ep}" + (f"-z{self.zero_stage}" if self.zero_stage else "")


def parse_expert_strategy(name: str) -> ExpertStrategy | None:
    """The expert-parallel strategy a name asks for, or None when it names none."""
    match = NAME.fullmatch(name)
    if match is None:
        if name.startswith("ep"):
            raise UserInputError(f"--strategies: {name!r} is no expert-parallel strategy; write {SYNTAX}")
        return None
    ep = int(match[1])
    if ep < 1:
        raise UserInputError(f"--strategies {name}: the expert-parallel size is at least 1")
    return ExpertStrategy(name, ep, int(match[2] or 0))


def all_to_all_share(rows: list[dict]) -> float | None:
    """The all-to-all's share of step time over these logged intervals (metrics.jsonl's
    `moe_all_to_all_share`: its wall seconds over the interval's, the mean over ranks)."""
    shares = [r["moe_all_to_all_share"] for r in rows if r.get("moe_all_to_all_share") is not None]
    return sum(shares) / len(shares) if shares else None
