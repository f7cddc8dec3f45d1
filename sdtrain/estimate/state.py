"""Model state per rank as each strategy really keeps it (data_parallel.py, zero.py).

The ZeRO paper's formulas (parallel/memory.py) count weights, gradients and optimizer
state; the implementation adds two things they leave out: stage 1 keeps the whole
gradients *and* its reduced shard, and every sharded stage keeps a gradient shard beside
the fp32 master. Counted from the same tensors `Strategy.state_bytes()` measures, so
summary.json's model_state_bytes checks this file.

Offload (ZeRO-Offload / -Infinity) moves state, it does not shrink it: `offload_optimizer`
moves the fp32 master (where it is separate from the weights: bf16/fp16) and Adam's m, v,
12Ψ/N mixed or 8Ψ/N fp32; `offload_params` (stage 3) the weight shard too, pΨ/N. `nvme` puts
them in files (disk), `cpu` in the host's memory beside a GPU (on a CPU rank plan.py has
already made `cpu` none). Gradients stay where backward makes them.
"""

from __future__ import annotations

from sdtrain.estimate.shape import RankShape
from sdtrain.estimate.terms import DEVICE, DISK, HOST, Term

ADAM_MOMENTS_BYTES = 8  # fp32 exp_avg + exp_avg_sq per parameter
OFFLOADED_TO = {"none": DEVICE, "cpu": HOST, "nvme": DISK}


def model_state(shape: RankShape) -> list[Term]:
    """Weights, gradients and optimizer state of this rank, at every ZeRO stage."""
    # Ψ: what the rank holds whole (its experts only, under expert parallelism); its shards
    # are the whole model's Ψ / N (experts are sharded over their own dp / ep ranks).
    whole, psi, n, stage = shape.params_held, shape.params, shape.dp, shape.zero_stage
    p = shape.weight_bytes
    if stage == 0:  # DDP: fp32 weights, fp32 gradients (the buckets), fp32 Adam moments
        return [Term("weights", 4 * whole, detail="4Ψ: fp32 (autocast casts on the fly)"),
                Term("gradients", 4 * whole, detail="4Ψ: fp32, DDP's buckets"),
                Term("optimizer state", ADAM_MOMENTS_BYTES * whole, detail="8Ψ: fp32 Adam moments")]
    master = 4 * psi / n if p != 4 else 0  # bf16 weights need a separate fp32 master shard
    weights = p * psi / n if stage == 3 else p * whole
    grads = p * psi / n + (p * whole if stage == 1 else 0)  # the reduced shard; stage 1 also the whole
    params_to, optimizer_to = OFFLOADED_TO[shape.offload_params], OFFLOADED_TO[shape.offload_optimizer]
    return [
        Term("weights", weights, detail=f"{p}Ψ{'/N' if stage == 3 else ''}: ZeRO {stage}, N = {n}"
             + _moved(shape.offload_params, "offload_params"), where=params_to),
        Term("gradients", grads, detail=f"{p}Ψ whole + {p}Ψ/N shard" if stage == 1 else f"{p}Ψ/N shard"),
        Term("optimizer state", ADAM_MOMENTS_BYTES * psi / n + master,
             detail="8Ψ/N Adam moments" + (" + 4Ψ/N fp32 master" if master else "")
             + _moved(shape.offload_optimizer, "offload_optimizer"), where=optimizer_to),
    ]


def _moved(offload: str, key: str) -> str:
    return {"none": "", "cpu": f"; {key} cpu: in host memory", "nvme": f"; {key} nvme: in files"}[offload]
