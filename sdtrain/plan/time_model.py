"""A layout's step time, term by term: what `plan --explain LAYOUT` prints.

compute     FLOPs / (peak x efficiency): the model's 6N + attention per token (model/size.py),
            the largest pipeline stage's share, split over tp, x 4/3 with activation
            checkpointing (forward runs again); efficiency rises with the micro-batch's tokens
tp          Megatron's per-layer collectives (estimate/tensor_parallel.py's bytes on the wire)
            on a node's links, not overlapped (each waits on the layer before it)
pp p2p      each micro-batch's activations forward and their gradients back across a stage
            boundary (V boundaries per rank under interleaving)
ep          the four all-to-alls of each MoE layer per micro-batch over the expert group
bubble      the schedule's idle share (parallel/schedules.py): (P-1)/(M+P-1) for gpipe and
            1f1b, (P-1)/(V·M+P-1) interleaved, zero bubble's simulated one; less where the
            other stages are lighter than the slowest (they fill and drain in their own time)
dp          gradient traffic by ZeRO stage with the overlap each really has: DDP all-reduces
            once, under the last micro-batch's backward; ZeRO-1 reduce-scatters and all-gathers
            in the step, exposed; ZeRO-2 reduce-scatters every micro-batch under its backward,
            all-gathers in the step; ZeRO-3 gathers weights forward and backward and
            reduce-scatters every micro-batch, prefetched under compute. No transfer hides on
            CPU ranks, where gloo's copies take the cores the matmuls need; ZeRO-3's latency
            (waiting, not work) still hides under the compute they leave
latency     every collective costs the cluster's latency however small it is (bench comm's
            smallest all-reduce): what dominates small models and many-layer ZeRO-3
optimizer   memory-bound Adam: the bytes of state it reads and writes / memory bandwidth; under
            ZeRO also its own passes over the gradients and weights (reduce, norm, clip, clear,
            publish), at memory bandwidth
offload     NVMe optimizer state: read and written back every step at the disk's bandwidth (on
            a CPU machine measured here, the page cache's, which serves the files), in
            sub-groups overlapped with the host's step where I/O runs beside it (a GPU's host);
            on CPU ranks the copies take the cores the step needs, so they add to it. The
            gradients and new weights cross PCIe
cores       more CPU ranks than cores (rank_share < 1): a rank's busy time stretches by 1 /
            rank_share; a pipeline's schedule runs with processor sharing (shared_cores.py),
            so its bubble is lent to the ranks that have work, and where fewer have work than
            there are cores (fill, drain) a core idles
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from sdtrain.model.size import flops_per_token
from sdtrain.parallel.schedules import bubble_formula
from sdtrain.plan.candidate import Candidate
from sdtrain.plan.cluster import Cluster
from sdtrain.plan.memory import Memory
from sdtrain.plan.shared_cores import shared_pipeline_span

RECOMPUTE = 4 / 3  # checkpointing runs forward (1/3 of forward + backward) twice
BACKWARD_SHARE = 2 / 3
ADAM_BYTES_PER_PARAM = 32  # reads the gradient (4), reads and writes master, m and v (24), writes the weight (4)
OFFLOADED_MOMENT_BYTES = 8  # m + v per parameter, read and written back every step
OFFLOADED_MASTER_BYTES = 4  # and the fp32 master where it is not the weights (bf16/fp16)
# ZeRO's own passes over memory each step, beside Adam's (parallel/zero.py's step): over the
# gradient shard, the reduced gradient added in (12), its norm (4), the clip (8) and the clear (4);
# over the whole rank's parameters at stage 1, the reduction's local copy (8), the whole-gradient
# buffer cleared (4) and the new weights published (8), at stage 2 the weights published (8)
ZERO_SHARD_PASS_BYTES = 28
ZERO_WHOLE_PASS_BYTES = {1: 20, 2: 8, 3: 0}
DDP_BUCKET_BYTES = 25 * 2**20  # the last bucket has no backward left to hide under
TP_CALLS_PER_LAYER = 4  # Megatron: attention's and the MLP's all-reduce, forward and backward (SP: twice as many)


@dataclass(frozen=True)
class TimeTerm:
    name: str
    seconds: float
    detail: str

    def as_dict(self) -> dict:
        return {"name": self.name, "seconds": self.seconds, "detail": self.detail}


@dataclass
class StepTime:
    terms: list[TimeTerm]
    tokens_per_step: int
    flops_per_token: float
    world: int
    peak_flops: float

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.terms)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.seconds

    @property
    def mfu(self) -> float:
        return self.tokens_per_s * self.flops_per_token / (self.world * self.peak_flops)


def ring(n: int, kind: str) -> float:
    """Share of a tensor each rank puts on its links: all-reduce 2(n-1)/n, the others (n-1)/n."""
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n


SIMULATED_ACTIONS = 64  # zero bubble: its own schedule simulated up to P x M of this; past it, the closed form


@lru_cache(maxsize=None)
def bubble_share(schedule: str, P: int, V: int, M: int) -> float:
    """The schedule's idle share (parallel/schedules.py). Zero bubble's simulation grows with
    P x M; past SIMULATED_ACTIONS, ZB-H1's closed form, a third of 1F1B's bubble with backward
    split evenly into B and W (Qi et al. 2023): (P-1) / (3M + P-1)."""
    if schedule == "zero_bubble" and P * M > SIMULATED_ACTIONS:
        return (P - 1) / (3 * M + P - 1)
    return bubble_formula(schedule, P, V, M)


_FLOPS: dict[str, float] = {}


def model_flops(model) -> float:
    """flops_per_token, once per model (its per-layer sum costs milliseconds at 96 layers)."""
    key = model.model_dump_json()
    if key not in _FLOPS:
        _FLOPS[key] = flops_per_token(model)
    return _FLOPS[key]


def stage_flops(model, shapes) -> list[float]:
    """FLOPs per token of each pipeline stage: its blocks' share, and the head's on the last."""
    head = 6.0 * model.vocab_size * model.d_model
    block = (model_flops(model) - head) / model.n_layers
    return [shape.layers * block + (head if shape.last else 0) for _, shape in shapes]


def bubble_balance(flops: list[float]) -> float:
    """The share of the balanced bubble an uneven pipeline idles, from its stages' FLOPs: the
    slowest stage waits while the others fill and drain, and they take their own time, not its.
    A step of M micro-batches over stages t_1..t_P takes about sum(t) + (M-1) max(t): the bubble
    is sum(t) - max(t), which is (P-1) max(t) only where every stage is as slow as the slowest.
    bench-20m's 7 blocks over 2 stages (4 + 3) at one micro-batch measured 0.53 s, where the
    balanced bubble said 0.61."""
    if len(flops) < 2:
        return 1.0
    return (sum(flops) - max(flops)) / ((len(flops) - 1) * max(flops))


def step_time(c: Candidate, recipe, memory: Memory, cluster: Cluster) -> StepTime:
    model, shapes = recipe.model, memory.shapes
    shape = max((s for _, s in shapes), key=lambda s: s.params)  # the stage with the most to reduce
    peak = cluster.peak_tflops * 1e12
    M, tokens = c.grad_accum_steps, c.micro_batch_size * model.seq_len
    act_bytes = 4 if recipe.train.precision == "fp32" else 2
    terms: list[TimeTerm] = []

    eff = cluster.efficiency_at(tokens)
    per_stage = stage_flops(model, shapes)
    flops = max(per_stage) * tokens / c.tp * (RECOMPUTE if c.activation_checkpointing else 1)
    compute = flops / (peak * eff)
    tp_overhead = cluster.tp_overhead(c.tp) if c.tp > 1 else None
    measured_tp = f" x {tp_overhead:.2f}, tp {c.tp}'s measured cost with its collectives" if tp_overhead else ""
    compute *= tp_overhead or 1.0
    terms.append(TimeTerm("compute", M * compute, f"{M} micro-batch(es) x {flops:.3g} FLOPs / ({peak / 1e12:g} "
                          f"TFLOP/s x {eff:.2f} at {tokens} tokens)" + measured_tp
                          + (" incl. recompute" if c.activation_checkpointing else "")))
    per_micro = compute

    if c.tp > 1 and not tp_overhead:
        bw = cluster.bandwidth(c.tp)
        calls = M * shape.layers * TP_CALLS_PER_LAYER * (2 if recipe.parallel.sequence_parallel else 1) \
            * (1.5 if c.activation_checkpointing else 1)
        tp = memory.estimate.tp_wire_bytes / bw + calls * cluster.latency
        terms.append(TimeTerm("tp collectives", tp, f"{memory.estimate.tp_wire_bytes / 2**20:.1f} MiB on the wire per "
                              f"step / {bw / 1e9:g} GB/s + {calls:g} calls x {cluster.latency_us:g} us, not overlapped"))
        per_micro += tp / M
    if c.pp > 1:
        split = c.tp if recipe.parallel.sequence_parallel else 1
        sent = 2 * tokens * model.d_model * act_bytes / split * c.virtual_stages
        bw = cluster.bandwidth(c.dp * c.tp + 1)
        p2p = sent / bw + 2 * c.virtual_stages * cluster.latency
        terms.append(TimeTerm("pp p2p", M * p2p, f"{M} x {sent / 2**20:.2f} MiB (activations forward, "
                              f"gradients back) / {bw / 1e9:g} GB/s, + latency"))
        per_micro += p2p
    if c.ep > 1 and shape.moe_layers:
        sent = 4 * shape.moe_layers * shape.expert_slots * model.d_model * act_bytes * ring(c.ep, "all_to_all")
        bw = cluster.bandwidth(c.ep * c.tp)
        a2a = sent / bw + 4 * shape.moe_layers * cluster.latency
        terms.append(TimeTerm("ep all-to-all", M * a2a, f"{M} x 4 x {shape.moe_layers} MoE layers x "
                              f"{shape.expert_slots} slots / {bw / 1e9:g} GB/s, + latency"))
        per_micro += a2a
    if c.pp > 1:
        bubble, balance = bubble_share(c.schedule, c.pp, c.virtual_stages, M), bubble_balance(per_stage)
        terms.append(TimeTerm("pipeline bubble", M * per_micro * bubble / (1 - bubble) * balance,
                              f"{bubble:.1%} idle: {c.schedule}, P={c.pp}, M={M}" + (f", V={c.virtual_stages}" if c.virtual_stages > 1 else "")
                              + (f"; x {balance:.2f}, the other stages lighter than the slowest" if balance < 1 else "")))

    terms += data_parallel_terms(c, shape, cluster, compute, M)
    terms += optimizer_terms(c, shape, cluster)
    terms += shared_cores_term(terms, c, cluster, [f / max(per_stage) for f in per_stage], per_micro)
    return StepTime(terms, c.micro_batch_size * M * c.dp * model.seq_len, model_flops(model), c.world, peak)


PIPELINED = ("compute", "tp collectives", "pp p2p", "ep all-to-all", "pipeline bubble")


def shared_cores_term(terms: list[TimeTerm], c: Candidate, cluster: Cluster, stage_weights: list[float],
                      per_micro: float) -> list[TimeTerm]:
    """More CPU ranks than cores: each rank's busy time stretches by 1 / rank_share, except where
    fewer ranks have work than there are cores: a pipeline's fill and drain, which its schedule,
    run with processor sharing (shared_cores.py), prices. The rest of the step (the optimizer,
    data parallelism's collectives) runs on every rank at once."""
    if cluster.rank_share >= 1:
        return []
    total = sum(t.seconds for t in terms)
    pipelined = sum(t.seconds for t in terms if t.name in PIPELINED)
    cores = c.world * cluster.rank_share
    if c.pp > 1:
        span = per_micro * shared_pipeline_span(c.schedule, c.pp, c.virtual_stages, c.grad_accum_steps,
                                                tuple(round(w, 4) for w in stage_weights), c.tp * c.dp, cores)
        how = f"the {c.schedule} schedule run with {cores:g} cores shared by {c.world} ranks: {span:.3g} s"
    else:
        span = pipelined / cluster.rank_share
        how = f"{pipelined:.3g} s of compute / {cluster.rank_share:g}"
    stretched = span + (total - pipelined) / cluster.rank_share
    if stretched <= total:
        return []
    return [TimeTerm("cores shared", stretched - total, f"{c.world} ranks on {cores:g} cores' worth: {how}, "
                     f"the rest {total - pipelined:.3g} s / {cluster.rank_share:g}")]


def data_parallel_terms(c: Candidate, shape, cluster: Cluster, compute: float, M: int) -> list[TimeTerm]:
    if c.dp == 1:
        return []
    bw, D, alpha = cluster.bandwidth(c.dp * c.tp), c.dp, cluster.latency
    g = 4 if c.zero_stage == 0 else shape.weight_bytes  # DDP reduces fp32 gradients
    size = shape.params * g  # a rank's (tp-local) gradients; experts reduce over fewer ranks, counted alike
    # what communication can hide under: nothing where it shares the cores (CPU ranks)
    backward = BACKWARD_SHARE * compute if cluster.overlaps else 0.0
    under = compute if cluster.overlaps else 0.0
    where = f"/ {bw / 1e9:g} GB/s over dp {D}"
    buckets = math.ceil(size / DDP_BUCKET_BYTES) if c.zero_stage in (0, 2) else 1
    if c.zero_stage == 0:
        comm = size * ring(D, "all_reduce") / bw + buckets * alpha
        tail = min(comm, DDP_BUCKET_BYTES * ring(D, "all_reduce") / bw + alpha)
        return [TimeTerm("dp all-reduce", max(comm - backward, tail),
                         f"{size / 2**20:.1f} MiB all-reduced {where}: {comm:.3g} s, under the last backward ({backward:.3g} s)")]
    gather = size * ring(D, "all_gather") / bw
    if c.zero_stage == 1:
        return [TimeTerm("dp reduce-scatter + all-gather", 2 * (gather + alpha),
                         f"2 x {size / 2**20:.1f} MiB in the step {where}, exposed")]
    if c.zero_stage == 2:
        scatter = gather + buckets * alpha
        return [TimeTerm("dp reduce-scatter", M * max(0.0, scatter - backward),
                         f"{M} x {scatter:.3g} s under each backward ({backward:.3g} s)"),
                TimeTerm("dp all-gather", gather + alpha, f"{size / 2**20:.1f} MiB of new weights {where}, exposed")]
    units = shape.layers + 1  # each block, and the root unit
    first = shape.block_params * g * ring(D, "all_gather") / bw + alpha  # the gather nothing runs under
    moved, waited = 3 * gather, 3 * units * alpha  # a micro-batch's bytes on the wire; its collectives' latency
    # Latency is waiting, not work: a prefetched gather's wait hides under the compute its transfer
    # leaves free even on CPU ranks, where the transfer itself cannot (it takes the cores). Measured
    # at 4 ranks on 2 cores (7 ms a collective): counting the waits in full put bench-20m's
    # tp2 x dp2 ZeRO-3 at 1.18 s, measured 0.75.
    exposed = max(0.0, moved - under) + max(0.0, waited - max(0.0, compute - moved))
    return [TimeTerm("zero-3 gathers + reduce-scatter", M * (exposed + 2 * first),
                     f"{M} x 3 x {size / 2**20:.1f} MiB in {units} units {where}: {moved:.3g} s moved under "
                     f"{under:.3g} s of compute, {waited:.3g} s of latency under what compute it leaves, "
                     "plus the first block's gather each way")]


def optimizer_terms(c: Candidate, shape, cluster: Cluster) -> list[TimeTerm]:
    shard = shape.params_held / (c.dp if c.zero_stage else 1)
    terms = zero_pass_terms(c, shape, shard, cluster)
    if c.offload == "none":
        bw = cluster.memory_gbps * 1e9
        return [TimeTerm("optimizer step", shard * ADAM_BYTES_PER_PARAM / bw,
                         f"{shard:.3g} params x {ADAM_BYTES_PER_PARAM} B / {cluster.memory_gbps:g} GB/s (memory-bound)")] + terms
    host = shard * ADAM_BYTES_PER_PARAM / (cluster.host_memory_gbps * 1e9)
    state = OFFLOADED_MOMENT_BYTES + (OFFLOADED_MASTER_BYTES if shape.weight_bytes != 4 else 0)
    disk = 2 * shard * state / (cluster.disk_gbps * 1e9)
    hidden = host if cluster.overlaps else 0.0  # CPU ranks: the copies take the cores the step runs on
    terms += [TimeTerm("optimizer step (host)", host, f"{shard:.3g} params x {ADAM_BYTES_PER_PARAM} B / "
                       f"{cluster.host_memory_gbps:g} GB/s"),
              TimeTerm("offload I/O", max(0.0, disk - hidden), f"{2 * shard * state / 2**30:.2f} GiB read + written / "
                       f"{cluster.disk_gbps:g} GB/s: {disk:.3g} s, "
                       + ("less the host step it overlaps" if cluster.overlaps else "on the cores the step needs"))]
    if cluster.device == "cuda":
        crossing = shard * (shape.weight_bytes * 2) / (cluster.pcie_gbps * 1e9)
        terms.append(TimeTerm("offload PCIe", crossing, f"gradients down, weights up / {cluster.pcie_gbps:g} GB/s"))
    return terms


def zero_pass_terms(c: Candidate, shape, shard: float, cluster: Cluster) -> list[TimeTerm]:
    """ZeRO's step besides Adam: passes over the gradient shard and, at stages 1-2, over the
    rank's whole parameters (ZERO_*_PASS_BYTES), memory-bound. At dp 1 under offload they are
    the whole model's: stage 1 with NVMe offload measured 0.30 s a step over stage 0 for the 4x
    bench model (51M parameters) on one rank, where the offloaded Adam alone, its I/O included,
    costs 0.09 s more than in memory; priced, these passes are 0.13 s and the I/O 0.12."""
    if not c.zero_stage:
        return []
    size = shard * ZERO_SHARD_PASS_BYTES + shape.params_held * ZERO_WHOLE_PASS_BYTES[c.zero_stage]
    return [TimeTerm("zero passes", size / (cluster.memory_gbps * 1e9),
                     f"{size / 2**20:.0f} MiB: the gradient shard reduced, normed, clipped and cleared"
                     + (", the weights published" if ZERO_WHOLE_PASS_BYTES[c.zero_stage] else "")
                     + f" / {cluster.memory_gbps:g} GB/s")]
