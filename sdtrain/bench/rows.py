"""The rows of `sdtrain bench`'s results: each entry's numbers, its layout's columns (a pipeline's
bubble, an MoE row's all-to-all share, tensor parallelism's T, sequence parallelism and bytes by
kind), and its ratios: to the peers that run its layout, for a pipeline or tensor-parallel
row to the plain data-parallel rows on the same workers (which to pick), and for an offload row
to its ZeRO stage in memory (what offload costs)."""

from __future__ import annotations

from sdtrain.bench.entry import Entry
from sdtrain.model.size import flops_per_token
from sdtrain.parallel.schedules import bubble_formula


def compared(entry: Entry, peer: Entry) -> bool:
    """Whether `peer` runs the layout of sdtrain's `entry` (their ratio is a row's vs_<peer>)."""
    return (peer.kind == "peer" and (peer.world, peer.stage, peer.stages, peer.ep, peer.tp)
            == (entry.world, entry.stage, entry.stages, entry.ep, entry.tp)
            and peer.offload in (None, entry.offload))  # an offloading peer: only its own offload's row


def _pipeline_columns(entry: Entry) -> dict:
    """Stages, schedule and micro-batches, the schedule's bubble formula, and for sdtrain's
    pipelines the bubble measured in the best round (the one whose tokens/s the row shows)."""
    if entry.pipeline is None:
        return {"pipeline_stages": 1}
    p = entry.pipeline
    formula = bubble_formula(p.schedule, p.stages, p.virtual_stages, entry.micro_batches)
    best = entry.samples.index(max(entry.samples)) if entry.bubbles else None
    return {"pipeline_stages": p.stages, "schedule": p.schedule, "virtual_stages": p.virtual_stages,
            "micro_batches": entry.micro_batches,
            "bubble": round(entry.bubbles[best], 4) if best is not None else None,
            "bubble_per_stage": [round(b, 4) for b in entry.bubble_per_stage[best]] if best is not None else None,
            "bubble_replayed": round(entry.bubbles_replayed[best], 4) if best is not None else None,
            "bubble_formula": round(formula, 4), "bubble_rounds": [round(b, 4) for b in entry.bubbles]}


def _expert_columns(entry: Entry) -> dict:
    """An ep<N> row's (or its peer's) expert-parallel size and all-to-all share of step time,
    in the best round (the one whose tokens/s the row shows)."""
    if not entry.ep:
        return {}
    best = entry.samples.index(max(entry.samples)) if entry.samples else None
    share = entry.all_to_all_shares[best] if best is not None and best < len(entry.all_to_all_shares) else None
    return {"expert_parallel": entry.ep, "all_to_all_share": round(share, 4) if share is not None else None}


def _offload_columns(entry: Entry) -> dict:
    """An offload row's settings and, from the best round (the one whose tokens/s the row shows),
    the exposed I/O wait per step and the bandwidths achieved (None where the run logged none)."""
    if entry.offload is None:
        return {}
    o = entry.offload
    best = entry.samples.index(max(entry.samples)) if entry.samples else None
    numbers = entry.offload_rounds[best] if best is not None and best < len(entry.offload_rounds) else {}
    return {"offload_optimizer": o.device, "offload_params": o.device if o.params else "none",
            **{key: (round(value, 4) if value is not None else None) for key, value in numbers.items()}}


def report(entries: list[Entry], recipe, steps: int, repeats: int, notes: list[str], peak: dict,
           tokens_per_step: dict[int, int]) -> dict:
    """The bench's results: a row per entry, with its ratios to the peers of its layout
    (`tokens_per_step`: the tokens of one step at each world size, for step_s)."""
    rows = []
    flops = flops_per_token(recipe.model)
    for entry in entries:
        row = {"name": entry.name, "kind": entry.kind, "world_size": entry.world, "zero_stage": entry.stage,
               "tokens_per_s": round(entry.tokens_per_s, 1), "rounds": [round(s, 1) for s in entry.samples],
               "step_s": round(tokens_per_step[entry.world] / entry.tokens_per_s, 4) if entry.tokens_per_s else None,
               "mfu": round(flops * entry.tokens_per_s / (peak["flops"] * entry.world), 4) if peak["flops"] else None,
               "peak_mem_gib": entry.peak_mem_gib, "model_state_bytes": entry.state_bytes,
               "comm_bytes_per_step": entry.comm_bytes, "tensor_parallel": entry.tp,
               "sequence_parallel": entry.sequence_parallel, "tp_bytes_per_step": entry.tp_bytes,
               **_pipeline_columns(entry), **_expert_columns(entry), **_offload_columns(entry)}
        if entry.kind == "sdtrain":
            for peer in entries:
                if compared(entry, peer) and peer.tokens_per_s:
                    row[f"vs_{peer.name}"] = round(entry.tokens_per_s / peer.tokens_per_s, 3)
                    back_to_back = entry.ep or entry.tp > 1 or peer.offload
                    if back_to_back and len(peer.samples) == len(entry.samples):
                        row["paired_ratios"] = [round(a / b, 3) for a, b in zip(entry.samples, peer.samples)]
            if entry.pipeline or entry.tp > 1:  # which to pick: against the same workers without it
                for other in entries:
                    if (other.kind == "sdtrain" and other.world == entry.world and not other.pipeline
                            and other.tp == 1 and not other.ep and not other.offload and other.tokens_per_s):
                        row[f"vs_{other.name}"] = round(entry.tokens_per_s / other.tokens_per_s, 3)
            if entry.offload:  # what offload costs: against the same stage in memory, on the same workers
                for other in entries:
                    if (other.kind == "sdtrain" and other.world == entry.world and other.stage == entry.stage
                            and not (other.offload or other.pipeline or other.ep or other.tp > 1) and other.tokens_per_s):
                        row[f"vs_{other.name}"] = round(entry.tokens_per_s / other.tokens_per_s, 3)
        rows.append(row)
    return {"recipe": recipe.name, "model": recipe.model.model_dump(), "precision": recipe.train.precision,
            "steps": steps, "repeats": repeats, "peak_flops": peak, "results": rows, "notes": notes}
