"""One entry of a bench (an sdtrain strategy or a peer at one world size): what it runs, and
what each round of it measured.

An entry's argv has `{out}` where each round's fresh output path goes: an sdtrain entry's
run directory (metrics.jsonl and summary.json are read from it), a peer's JSON result file.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.bench.entry_failure import entry_failure
from sdtrain.bench.moe_strategy import all_to_all_share
from sdtrain.bench.offload_strategy import OffloadStrategy, offload_numbers
from sdtrain.bench.pipeline_strategy import PipelineStrategy
from sdtrain.launch.drills import ActiveDrill
from sdtrain.launch.node import threads_per_worker

PEER_OFFLOAD_KEYS = ("offload_wait_s", "offload_read_gib", "offload_write_gib")


@dataclass
class Entry:
    name: str
    world: int
    kind: str  # "sdtrain" or "peer"
    stage: int  # the ZeRO stage it is, or is compared with
    argv: list[str]  # what to run; {out} is replaced by a fresh path per round
    samples: list[float] = field(default_factory=list)  # tokens/s per round
    peak_mem_gib: list[float] = field(default_factory=list)
    state_bytes: list[int] | None = None
    comm_bytes: int | None = None
    pipeline: PipelineStrategy | None = None  # P stages (and its schedule), or none
    micro_batches: int | None = None  # M, for a pipeline
    bubbles: list[float] = field(default_factory=list)  # per round: mean over the intervals after warm-up
    bubble_per_stage: list[list[float]] = field(default_factory=list)
    bubbles_replayed: list[float] = field(default_factory=list)  # per round: the schedule on its compute times
    ep: int | None = None  # an MoE row's expert-parallel size (None: not an ep<N> row)
    all_to_all_shares: list[float | None] = field(default_factory=list)  # per round
    tp: int = 1  # tensor-parallel ranks (a peer's: those of the rows it is compared with)
    sequence_parallel: bool = False
    tp_bytes: dict[str, int] | None = None  # TP's bytes per step by kind (metrics.jsonl's tp_bytes)
    offload: OffloadStrategy | None = None  # a zero<S>-nvme|cpu row
    offload_rounds: list[dict] = field(default_factory=list)  # per round: wait and bandwidths (offload_strategy.py)

    @property
    def stages(self) -> int:
        return self.pipeline.stages if self.pipeline else 1

    @property
    def tokens_per_s(self) -> float:
        return max(self.samples) if self.samples else 0.0


def measure(entry: Entry, out: Path, drills: list[ActiveDrill]) -> str | None:
    """Run one entry once and record its numbers. A failed peer is reported (the note this
    returns), not fatal, so one broken peer does not cost the rest of the table; a failed
    sdtrain entry raises BenchEntryFailed naming its root cause (`drills`: the active ones)."""
    argv = [str(out) if arg == "{out}" else arg for arg in entry.argv]
    # The same thread budget for sdtrain and its peers, whatever each launcher defaults to.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker(entry.world))}
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        if entry.kind == "sdtrain":  # our own failure is a bug to see, not a footnote
            raise entry_failure(entry.name, entry.world, argv, out, result.returncode, result.stdout + result.stderr,
                                drills)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        cause = next((line.strip() for line in lines if "Root Cause" in line or "Error" in line), lines[-1] if lines else "")
        return f"exit {result.returncode}: {cause[:200]}"
    if entry.kind == "sdtrain":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        entry.samples.append(statistics.median(r["tokens_per_s"] for r in rows[1:]))
        if entry.ep:
            entry.all_to_all_shares.append(all_to_all_share(rows[1:]))
        if entry.offload:
            entry.offload_rounds.append(offload_numbers(rows[1:]))
        if "bubble" in rows[0]:  # a pipeline's idle share, over the intervals tokens/s is taken from
            entry.bubbles.append(statistics.mean(r["bubble"] for r in rows[1:]))
            per_stage = zip(*(r["bubble_per_stage"] for r in rows[1:]))
            entry.bubble_per_stage.append([statistics.mean(stage) for stage in per_stage])
            entry.bubbles_replayed.append(statistics.mean(r["bubble_replayed"] for r in rows[1:]))
        entry.peak_mem_gib = summary["peak_mem_gib"]
        entry.state_bytes = [sum(s.values()) for s in summary["model_state_bytes"]]
        entry.comm_bytes = rows[-1].get("comm_bytes")
        entry.tp_bytes = rows[-1].get("tp_bytes")
    else:
        result = json.loads(out.read_text())
        if "skipped" in result:  # a peer that cannot run here says why (DeepSpeed's async_io op, say)
            return f"skipped: {result['skipped']}"
        entry.samples.append(statistics.median(result["tokens_per_s"][1:]))
        if entry.ep:
            entry.all_to_all_shares.append(result.get("all_to_all_share"))
        if entry.offload:  # what the peer measured of its own I/O (peer_deepspeed_nvme.py)
            entry.offload_rounds.append({key: result.get(key) for key in PEER_OFFLOAD_KEYS})
        entry.peak_mem_gib = result["peak_mem_gib"]
    return None
