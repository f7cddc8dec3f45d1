"""Transient buffers: memory a step holds for a moment, by strategy (data_parallel.py,
zero.py, zero3.py, model/chunked_loss.py, torch's AdamW), the gradients that flow
through backward, and nvme offload's bounded buffers in host memory.
"""

from __future__ import annotations

import math

from sdtrain.estimate.shape import RankShape
from sdtrain.estimate.terms import ALWAYS, HOST, STEP_FB, STEP_OPT, Term
from sdtrain.parallel.offload.sub_groups import sub_group_numel

MiB = 2**20
DDP_BUCKET_BYTES = 25 * MiB  # torch DDP's bucket_cap_mb
# a pipeline's replicas average in step (parallel/data_parallel.py): the small gradients together up
# to this, a larger one alone and in place
AVERAGE_BUCKET_BYTES = 4 * MiB
REDUCE_SCATTERS_IN_FLIGHT = 2  # zero.MAX_REDUCE_SCATTERS_IN_FLIGHT, plus the bucket being filled
BACKWARD_VALUES = 8  # fp32 values per token and channel alive while one block's backward runs


def backward_gradients(shape: RankShape) -> list[Term]:
    """The activation gradients of the block being differentiated (fc and GELU gradients
    are 4 values per token and channel each)."""
    split = f" / tp {shape.tp}" if shape.tp > 1 else ""  # fc's and GELU's features are split over tp
    return [Term("backward temporaries", BACKWARD_VALUES * shape.tokens * shape.d_model * 4 / shape.tp, STEP_FB,
                 f"{BACKWARD_VALUES} values/token/channel of the block in backward{split}")]


def loss_buffers(shape: RankShape) -> list[Term]:
    """The head and loss (last stage only). Chunked (chunked_loss.py): the head's fp32
    gradient and the hidden states' gradient are made in forward and held into backward,
    beside one chunk of logits (and its log-sum-exp temporary). Unchunked: every token's
    logits, an fp32 copy, and their gradient."""
    if not shape.last:
        return []
    tokens, V, d = shape.tokens, shape.vocab_size // shape.tp, shape.d_model  # a tp rank's vocabulary slice
    slice_note = f", {V} of the vocabulary's {shape.vocab_size} (tp {shape.tp})" if shape.tp > 1 else ""
    if shape.loss_chunk_tokens:
        chunk = min(shape.loss_chunk_tokens, tokens)
        held = 4 * V * d + 4 * tokens * d
        return [Term("logits and loss", held + 2 * 4 * chunk * V, STEP_FB,
                     f"head gradient + hidden gradient + 2 x {chunk}-token logits chunk{slice_note}")]
    return [Term("logits and loss", 3 * 4 * tokens * V + 4 * tokens * d, STEP_FB,
                 f"all {tokens} tokens' logits, fp32 copy and gradient (loss_chunk_tokens 0){slice_note}")]


def strategy_buffers(shape: RankShape) -> list[Term]:
    """What the data-parallel strategy holds for a moment in backward."""
    p = shape.weight_bytes
    if shape.zero_stage == 0:
        if shape.dp == 1:
            return []
        if shape.pipelined:
            return [Term("gradient bucket", min(AVERAGE_BUCKET_BYTES, 4 * shape.params_held), STEP_OPT,
                         "small gradients averaged together in step, up to 4 MiB (larger ones in place)")]
        bucket = min(DDP_BUCKET_BYTES, 4 * shape.params_held)
        return [Term("DDP bucket in flight", bucket, STEP_FB, "gloo's all-reduce of one 25 MiB gradient bucket")]
    bucket_elems = shape.reduce_bucket_mb * MiB / p
    staging = Term("flat-buffer staging", min(2 * shape.reduce_bucket_mb * MiB, 2 * p * shape.params_held), STEP_FB,
                   "gradients and weights copied into and out of flat units (measured, about two buckets)")
    if shape.zero_stage == 1:
        return [staging]  # the whole gradients are state (state.py), reduced in step
    if shape.zero_stage == 2:  # buckets of reduce_bucket_mb
        whole, how = (REDUCE_SCATTERS_IN_FLIGHT + 1) * bucket_elems, f"{REDUCE_SCATTERS_IN_FLIGHT} in flight + 1 filling"
    else:  # units are blocks, and the root unit, whose gradients wait from the final norm's (first) to the embedding's (last)
        whole = shape.root_params + (REDUCE_SCATTERS_IN_FLIGHT + 1) * shape.block_params
        how = f"the root unit's + {REDUCE_SCATTERS_IN_FLIGHT} blocks' in flight + 1 filling"
    terms = [staging, Term("reduce-scatter buckets", min(whole, shape.params_held) * p, STEP_FB, f"whole gradients: {how}")]
    if shape.zero_stage == 3:
        blocks = min(1 + shape.prefetch_blocks, shape.layers)
        gathered = (shape.root_params + blocks * shape.block_params) * p
        terms.append(Term("gathered weights", gathered, STEP_FB,
                          f"root unit + {blocks} block(s) whole (1 running + {shape.prefetch_blocks} prefetched)"))
    return terms


def optimizer_buffers(shape: RankShape) -> list[Term]:
    """The optimizer step's temporaries: fused AdamW updates in place and makes none; ZeRO
    clips an fp32 copy of the gradient shard under bf16, and on NCCL publishes by cloning
    every unit's new weight shard before the all-gathers (gloo's ring gathers in place:
    parallel/comm.py)."""
    if shape.zero_stage == 0:
        return []
    shard = shape.params / shape.dp
    temps, what = 0.0, []
    if shape.device == "cuda":
        temps += shape.weight_bytes * shard
        what.append("weights published by all-gather")
    if shape.weight_bytes == 2:
        temps += 4 * shard  # the gradient shard in fp32 for clipping and Adam (fp16: unscaled in it)
        what.append("the gradient shard in fp32")
    return [Term("optimizer temporaries", temps, STEP_OPT, ", ".join(what))] if temps else []


def largest_unit_shard(shape: RankShape) -> int:
    """Elements of the largest ZeRO unit's shard on this rank (zero_units.py): at stage 3 a
    block or the root unit; at stages 1/2 a bucket, which closes once past reduce_bucket_mb, so
    by at most one parameter more (an MLP matrix, or the vocabulary's embedding or head)."""
    if shape.zero_stage == 3:
        largest = max(shape.block_params, shape.root_params)
    else:
        limit = shape.reduce_bucket_mb * 2**20 / shape.weight_bytes
        vocabulary = shape.vocab_size * shape.d_model / shape.tp if shape.first or shape.last else 0
        largest = min(shape.params_held, limit + max(shape.mlp_ratio * shape.d_model ** 2 / shape.tp, vocabulary))
    return max(1, math.ceil(largest / shape.dp))


def offload_buffers(shape: RankShape) -> list[Term]:
    """nvme offload's resident working set in host memory: up to `buffer_count` sub-group
    buffers of fp32 state in flight (read the next, step this one, write the last back), each
    a sub-group of the master (where separate: bf16/fp16) and m, v; never more buffers than the
    shard has sub-groups. (The gradients the step reads are the resident shard, counted as
    such.) Under offload_params nvme, the staging buffers a block's shard is read into before
    its gather (offload/params.py: the running block, its prefetched ones and one read ahead of
    them, and the root unit); under fp32 without an nvme optimizer to read them in sub-groups,
    the weight shards (the masters) come back whole for the step."""
    terms = []
    if shape.offload_optimizer == "nvme":
        # a sub-group never spans units: a unit's shard smaller than sub_group_mb is its own
        group = min(sub_group_numel(shape.sub_group_mb), largest_unit_shard(shape))
        kinds = 3 if shape.weight_bytes == 2 else 2
        buffers = min(shape.buffer_count, math.ceil(shape.params / shape.dp / group))
        # made at the first step and kept (OffloadedAdam.buffers): resident in every phase after it
        terms.append(Term("offload sub-group buffers", buffers * group * kinds * 4, ALWAYS,
                          f"{buffers} buffers x {group / 1e6:.2f}M parameters x {kinds} fp32 "
                          f"({'master, m, v' if kinds == 3 else 'm, v'})", where=HOST))
    if shape.offload_params == "nvme":
        blocks = min(2 + shape.prefetch_blocks, shape.layers)
        staged = (shape.root_params + blocks * shape.block_params) / shape.dp * shape.weight_bytes
        terms.append(Term("offload weight staging", staged, STEP_FB,
                          f"root unit + {blocks} block shard(s) read from the files before their gather", where=HOST))
    if shape.offload_params != "none" and shape.weight_bytes == 4 and shape.offload_optimizer != "nvme":
        terms.append(Term("weight shards loaded for the step", 4 * shape.params / shape.dp, STEP_OPT,
                          "fp32: the masters are the weight shards, whole for the optimizer's step"))
    return terms
