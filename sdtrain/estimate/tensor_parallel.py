"""What tensor parallelism changes in one rank's memory and traffic, as
parallel/tensor_parallel.py splits sdtrain's GPT over T ranks (torch-free).

Parameters. Split over the T ranks: attention's qkv (weight and bias) and proj weight, the
MLP's fc (weight and bias) and proj weight (llama: q, k, v, proj, and SwiGLU's gate, up and
proj; no biases), the token embedding and the head, tied to it or not (a pipeline's last
stage holds its own copy, split too). Whole on every tp rank: the norms, the position
embedding, the row-parallel layers' biases (added once, after the sum), and an MoE block's
router and experts (tp_moe.py: only its attention is split). ZeRO then shards what a rank
holds over its dp ranks, as without TP.

Activations (per block and token, in fp32-sized values; activations.py's 16 of fp32, 12 of
bf16): what the column-parallel layers make is split by heads or features (qkv, attention
out, fc and GELU out). Four stay whole without sequence parallelism: the block's input,
the residual, and the two norm outputs the column-parallel layers save. With it the block's
input and the residual are split along the sequence, and the column-parallel layers keep only
this rank's part of their input, gathering it again in backward (tp_gathered_linear.py, as
Megatron-LM does): every value is split, 16/T of fp32 (`python -m sdtrain.bench.tp_activations`
counts 0.48 of tp 1 at T = 2, 0.24 at T = 4). Not under the zero-bubble schedule, whose
deferred weight pass keeps the two gathered inputs whole (2 + 14/T); the estimate assumes the
re-gather.

Traffic: parallel/tp_volume.py's Megatron accounting, per step and rank (with SP's backward
re-gathers for gpt2's blocks; llama's q, k, v and gate, up share one gather whose whole input
they keep, so none); a block whose activations are recomputed (activation checkpointing) runs
its forward collectives again.
"""

from __future__ import annotations

from sdtrain.model.size import has_bias, is_llama, kv_heads, mlp_width, moe_at
from sdtrain.parallel.tp_volume import tp_step_bytes

WHOLE_VALUES = 4  # of a block's values per token and channel, those TP without SP leaves whole (SP: none)
KEPT_GATHERED_INPUTS = 2  # the two norm outputs, gathered whole, where SP does not re-gather them in backward
RECOMPUTED_COLLECTIVES = 2  # per block under activation checkpointing: attention's and the MLP's forward


def block_split_params(model, index: int = 0) -> int:
    """Block `index`'s parameters that TP splits over its ranks (an MoE block: its attention's)."""
    d, hidden = model.d_model, mlp_width(model)
    if is_llama(model):
        attention = 2 * d * d + 2 * d * kv_heads(model) * (d // model.n_heads)  # q, proj; k, v
        mlp = 3 * d * hidden  # gate, up, proj
    else:
        b = 1 if has_bias(model) else 0
        attention = 3 * d * d + b * 3 * d + d * d
        mlp = d * hidden + b * hidden + hidden * d
    return attention + (0 if moe_at(model, index) is not None else mlp)


def split_params(model, layers: list[int], embedding: bool, head_copy: bool) -> int:
    """The parameters of a rank's part (blocks `layers`, the token embedding, a head of its
    own: untied, or a tied head's copy) that TP splits; the rest is whole on every tp rank."""
    vocab = model.vocab_size * model.d_model
    return sum(block_split_params(model, i) for i in layers) + vocab * (int(embedding) + int(head_copy))


def tp_local(params: int, split: int, tp: int) -> int:
    """What one tp rank holds of a part of `params` parameters, `split` of them split."""
    return params - split + split // tp


def layer_values(values: int, tp: int, sequence_parallel: bool, regathered: bool = True) -> float:
    """A block's kept values per token and channel on one tp rank. `regathered`: under SP the
    column-parallel layers keep only their part of the input (gpt2's); llama's q, k, v and
    gate, up keep the whole input of the one gather they share (2 whole values)."""
    whole = (0 if regathered else KEPT_GATHERED_INPUTS) if sequence_parallel else WHOLE_VALUES
    return whole + (values - whole) / tp


def tp_traffic(n_layers: int, tokens: int, d_model: int, sequence_parallel: bool, element_size: int,
               embedding: bool, head: bool, recompute: bool, regathered: bool = True) -> dict[str, int]:
    """Bytes per collective kind one tp rank moves in a step of `tokens` tokens through its
    `n_layers` blocks (tp_volume.py's count, plus the recomputed forward's). `regathered`:
    whether SP's column-parallel layers gather their input again in backward (not llama's)."""
    counted = tp_step_bytes(n_layers, tokens, d_model, sequence_parallel, element_size, embedding, head,
                            regathered)
    if recompute and n_layers:
        # the forward's share of a block's collectives, so without the backward re-gathers
        again = tp_step_bytes(n_layers, tokens, d_model, sequence_parallel, element_size, False, False,
                              regathered=False)
        share = RECOMPUTED_COLLECTIVES / 4  # of the four collectives of a block, the forward's
        for kind, value in again.items():
            counted[kind] = counted.get(kind, 0) + round(value * share)
    return counted


def wire_bytes(counted: dict[str, int], tp: int) -> int:
    """What those collectives put on each rank's links in a ring: an all-reduce 2(T-1)/T of its
    tensor, an all-gather or reduce-scatter (T-1)/T (so SP moves what plain TP moves)."""
    factor = {"all_reduce": 2 * (tp - 1) / tp, "all_gather": (tp - 1) / tp, "reduce_scatter": (tp - 1) / tp}
    return round(sum(factor[kind] * value for kind, value in counted.items()))
