"""What forward keeps for backward, per rank (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", section 4.1), fitted to sdtrain's GPT.

Korthikanti count s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit with dropout: 34 s·b·h is
17 values per token and channel, of which one is a dropout mask; 5·a·s²·b is the attention
scores, softmax and its dropout mask. sdtrain's GPT without dropout keeps 16 values per
token and channel per block, measured with saved-tensor hooks (model/gpt.py: LayerNorm in,
qkv 3, attention out 1 + its q, k, v views, residual 1, LayerNorm 1 + out 1, fc out 4,
GELU out 4), plus one for the embedding's output; under bf16 autocast the matmul outputs
are half as wide (12 fp32-equivalents, measured). Flash-style attention (CPU's and CUDA's
scaled_dot_product_attention kernels without dropout) keeps no T x T scores; the math path
(dropout on CPU) keeps the scores, softmax and dropout mask, 4 fp32 values per score
(measured), plus a 1-byte dropout mask per residual branch.

With activation checkpointing a block keeps only its input; its activations come back one
block at a time in backward.
"""

from __future__ import annotations

from sdtrain.estimate.shape import RankShape
from sdtrain.estimate.tensor_parallel import layer_values
from sdtrain.estimate.terms import STEP_FB, Term

VALUES_PER_LAYER = {"fp32": 16, "bf16": 12, "fp16": 12}  # fp32-sized values per token and channel
SCORE_VALUES = {True: 4, False: 2}
RECOMPUTE_COPIES = 2  # a recomputed block's activations and their gradients (measured: 2x, not 1x)  # math attention: fp32 values per score, with / without dropout


def layer_bytes(shape: RankShape) -> float:
    """Bytes one block keeps for backward for one micro-batch (one tp rank's: its heads and
    features, and under SP its part of the sequence; estimate/tensor_parallel.py)."""
    tokens, d = shape.tokens, shape.d_model
    kept = layer_values(VALUES_PER_LAYER[shape.precision], shape.tp, shape.sequence_parallel,
                        shape.regathered_inputs) * tokens * d * 4
    if shape.attention == "math":
        scores = shape.micro_batch * (shape.n_heads // shape.tp) * shape.seq_len**2
        kept += SCORE_VALUES[shape.dropout > 0] * scores * (4 if shape.precision == "fp32" else 2)
    if shape.dropout > 0:
        kept += 2 * tokens * d / shape.sequence_split  # bool masks of the two residual dropouts
    return kept


def activations(shape: RankShape) -> list[Term]:
    tokens, d, L = shape.tokens, shape.d_model, shape.layers
    per_micro = tokens * d * 4 * (1 if shape.first else 0) / shape.sequence_split  # the embedding's output
    if shape.checkpointing:
        kept = L * tokens * d * 4 / shape.sequence_split  # each block's input
        how = f"{L} block inputs x {shape.in_flight} micro-batch(es) (checkpointing)"
        terms = [Term("activations", (kept + per_micro) * shape.in_flight, STEP_FB, how),
                 Term("recomputed block", RECOMPUTE_COPIES * layer_bytes(shape), STEP_FB,
                      "one block's activations, back in backward, and their gradients")]
    else:
        values = VALUES_PER_LAYER[shape.precision]
        if shape.tp > 1:
            per_block = layer_values(values, shape.tp, shape.sequence_parallel, shape.regathered_inputs)
            values = f"{per_block:g} (tp {shape.tp}" + \
                     (", sequence parallel)" if shape.sequence_parallel else ")")
        how = f"{L} blocks x {values} values/token/channel, {shape.attention} attention, x {shape.in_flight} micro-batch(es)"
        terms = [Term("activations", (L * layer_bytes(shape) + per_micro) * shape.in_flight, STEP_FB, how)]
    return terms


MLP_VALUES = 8  # of the 16 above, the dense MLP's: fc out 4 + GELU out 4 per channel
EXPERT_VALUES = 10  # per capacity slot and channel: dispatched input 1, fc out 4, GELU out 4, output 1


def expert_activations(shape: RankShape) -> list[Term]:
    """An MoE block keeps its experts' activations per capacity slot (E x C of them, k x the
    capacity factor per token, whichever rank computes them: all-to-all brings as many
    slots as it sends) instead of the dense MLP's per token: the difference, per MoE block."""
    if not shape.moe_layers:
        return []
    extra = (EXPERT_VALUES * shape.expert_slots - MLP_VALUES * shape.tokens) * shape.d_model * 4
    if shape.checkpointing:  # one block's worth comes back in backward
        return [Term("expert activations", max(extra, 0) * RECOMPUTE_COPIES, STEP_FB,
                     f"one MoE block's {shape.expert_slots} capacity slots, recomputed")]
    return [Term("expert activations", max(extra, 0) * shape.moe_layers * shape.in_flight, STEP_FB,
                 f"{shape.moe_layers} MoE blocks x {shape.expert_slots} capacity slots x {EXPERT_VALUES} values/channel, "
                 f"beyond the dense MLP's")]
