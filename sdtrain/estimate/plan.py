"""A recipe at a world size -> the memory estimate of each kind of rank, and the largest.

Every rank of a plain data-parallel or ZeRO job holds the same; a pipeline's stages differ
(their layers, the embeddings on the first, the head on the last, and how many
micro-batches each keeps alive), so each stage gets its own estimate.
"""

from __future__ import annotations

import math
from pathlib import Path

from sdtrain.estimate.activations import activations, expert_activations
from sdtrain.estimate.buffers import (backward_gradients, loss_buffers, offload_buffers, optimizer_buffers,
                                      strategy_buffers)
from sdtrain.estimate.process import process_base
from sdtrain.estimate.shape import DTYPE_BYTES, RankShape
from sdtrain.estimate.tensor_parallel import split_params, tp_local, tp_traffic, wire_bytes
from sdtrain.estimate.state import model_state
from sdtrain.estimate.terms import ALWAYS, Estimate, Term
from sdtrain.model.size import embedding_params, expert_params, final_norm_params, head_params, is_llama, moe_of
from sdtrain.parallel.layout import Layout
from sdtrain.parallel.partition import chunk_params, describe_stages

# One function per term, in the order the table shows them; a strategy that adds memory
# (experts, say) adds its function here.
TERMS = (process_base, model_state, activations, expert_activations, backward_gradients, loss_buffers, strategy_buffers,
         optimizer_buffers, offload_buffers)


ALLOCATOR_SLACK = 0.12  # CPU: freed memory the C allocator keeps, as a share of the tensors at the peak (measured)


CPU_OFFLOAD_NOTE = "offload cpu: no GPU here, the same as none"


def estimate_shape(shape: RankShape, where: str = "", notes: list[str] | None = None) -> Estimate:
    estimate = Estimate([term for fn in TERMS for term in fn(shape)], where, notes=list(notes or []),
                        host_is_device=shape.device == "cpu")
    if shape.tp > 1:
        estimate.tp_bytes = tp_traffic(shape.layers, shape.tokens * shape.grad_accum, shape.d_model,
                                       shape.sequence_parallel, DTYPE_BYTES[shape.precision], shape.first, shape.last,
                                       shape.checkpointing, shape.regathered_inputs)
        estimate.tp_wire_bytes = wire_bytes(estimate.tp_bytes, shape.tp)
    if shape.device == "cpu":
        tensors = sum(t.bytes for t in estimate.at_peak() if t.name not in ("process base", "corpus"))
        estimate.terms.append(Term("allocator slack", ALLOCATOR_SLACK * tensors, ALWAYS,
                                   f"{ALLOCATOR_SLACK:.0%} of the tensors: freed memory glibc keeps (measured)"))
    return estimate


def block_size(model, index: int, ep: int = 1) -> int:
    """Block `index`'s parameters a rank gathers (a middle chunk of one block: no embeddings,
    no head; of an MoE block, the rank's E / ep experts)."""
    experts = expert_params(model, index)
    return chunk_params(1, [index], 3, model) - experts + experts // ep


def in_flight(pipeline, stage: int, micro_batches: int) -> float:
    """Micro-batches whose activations a pipeline stage holds at once: GPipe all M; 1F1B
    and zero bubble at most P - stage (the first stage P); interleaved that times
    1 + (P-1)/(P·V) (Narayanan et al. 2021)."""
    P, M = pipeline.stages, micro_batches
    if P == 1:
        return 1
    if pipeline.schedule == "gpipe":
        return M
    held = min(P - stage, M)
    if pipeline.schedule == "interleaved":
        held *= 1 + (P - 1) / (P * pipeline.virtual_stages)
    return held


def expert_slots(model, tokens: int) -> int:
    """E x C of one MoE layer for one micro-batch's tokens (model/moe/gating.py's capacity;
    dropless: the slots of an even split, k per token)."""
    moe = moe_of(model)
    if moe is None:
        return 0
    E, k = moe["num_experts"], moe["top_k"]
    if not moe["drop_tokens"]:
        return k * tokens
    return E * max(math.ceil(k * tokens / E * moe["capacity_factor"]), moe["min_capacity"])


def corpus_bytes(data) -> int:
    """Text read into memory by each worker (token files are mapped, not read)."""
    if data.format == "bin" or str(data.source).endswith(".bin"):
        return 0
    path = Path(data.source)
    if data.source != "stdlib" and path.is_file():
        return min(path.stat().st_size, data.max_bytes)
    return data.max_bytes


def effective_offload(zero, device: str) -> tuple[str, str]:
    """(offload_optimizer, offload_params) as they act on `device`: `cpu` on a CPU rank is none
    (the state is in host memory already)."""
    def acting(value: str) -> str:
        return "none" if value == "cpu" and device == "cpu" else value
    return acting(zero.offload_optimizer), acting(zero.offload_params)


def offload_notes(recipe, device: str) -> list[str]:
    zero = recipe.parallel.zero
    return [CPU_OFFLOAD_NOTE] if device == "cpu" and "cpu" in (zero.offload_optimizer, zero.offload_params) else []


def rank_shapes(recipe, world_size: int, device: str, micro_batches: int | None = None) -> list[tuple[str, RankShape]]:
    """(which ranks, their shape) for each pipeline stage."""
    model, train, parallel = recipe.model, recipe.train, recipe.parallel
    pipeline = parallel.pipeline
    layout = Layout.of(recipe, world_size)
    dp, ep = layout.dp, layout.ep
    M = micro_batches or train.grad_accum_steps or 1
    attention = "math" if device == "cpu" and model.dropout > 0 else "flash"
    shapes = []
    stages = describe_stages(pipeline, model)
    tp = layout.tp
    offload = effective_offload(parallel.zero, device)
    for row in stages:
        layers = [i for chunk in row["layers"] for i in chunk]
        first, last = row["stage"] == 0, row["stage"] == len(stages) - 1
        head = head_params(model, first, last)  # an untied head, or a tied head's copy on a last stage
        head_copy = head > 0
        root = (embedding_params(model) if first else 0) + (final_norm_params(model) if last else 0) + head
        # one tp rank's piece of each (what ZeRO then shards over dp); an MoE block's experts stay whole
        params = tp_local(row["params"], split_params(model, layers, first, head_copy), tp)
        block = max(tp_local(block_size(model, i, ep), split_params(model, [i], False, False), tp) for i in layers)
        root = tp_local(root, split_params(model, [], first, head_copy), tp)
        shape = RankShape(
            params=params, layers=len(layers), block_params=block, root_params=root,
            first=first, last=last, d_model=model.d_model, n_heads=model.n_heads, seq_len=model.seq_len,
            vocab_size=model.vocab_size, mlp_ratio=model.mlp_ratio, micro_batch=train.micro_batch_size or 1,
            in_flight=in_flight(pipeline, row["stage"], M), pipelined=pipeline.stages > 1, dp=dp,
            zero_stage=parallel.zero_stage,
            reduce_bucket_mb=parallel.zero.reduce_bucket_mb, prefetch_blocks=parallel.zero.prefetch_blocks,
            precision=train.precision, checkpointing=train.activation_checkpointing, attention=attention,
            dropout=model.dropout, device=device, loss_chunk_tokens=train.loss_chunk_tokens,
            data_bytes=corpus_bytes(recipe.data),
            expert_params=sum(expert_params(model, i) for i in layers), ep=ep,
            moe_layers=sum(1 for i in layers if expert_params(model, i)),
            expert_slots=expert_slots(model, (train.micro_batch_size or 1) * model.seq_len),
            tp=tp, sequence_parallel=parallel.sequence_parallel, grad_accum=M,
            regathered_inputs=not is_llama(model),
            offload_optimizer=offload[0], offload_params=offload[1],
            sub_group_mb=parallel.zero.sub_group_mb, buffer_count=parallel.zero.buffer_count,
        )
        where = "every rank" if len(stages) == 1 else f"pipeline stage {row['stage']}"
        shapes.append((where, shape))
    return shapes


def estimate_recipe(recipe, world_size: int, device: str = "cpu") -> list[Estimate]:
    """One estimate per kind of rank (one, or one per pipeline stage)."""
    notes = offload_notes(recipe, device)
    return [estimate_shape(shape, where, notes) for where, shape in rank_shapes(recipe, world_size, device)]


def largest(estimates: list[Estimate]) -> Estimate:
    return max(estimates, key=lambda e: e.total)
