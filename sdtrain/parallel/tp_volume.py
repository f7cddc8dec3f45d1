"""The bytes tensor parallelism moves per step and rank, as Megatron-LM accounts them
(Narayanan et al. 2021, Korthikanti et al. 2022): what `TensorParallel.take_bytes` should
count, for `estimate` and the tests. Torch-free.

Per layer, without sequence parallelism: four all-reduces of the [tokens, d_model]
activations: forward after attention's and the MLP's row-parallel layer, backward before
their column-parallel ones. With sequence parallelism each becomes an all-gather and a
reduce-scatter of the same tensor: the same volume, since a ring all-reduce is a
reduce-scatter followed by an all-gather. And, as Megatron-LM does (Korthikanti et al.
2022, section 4.2.2), the two column-parallel layers keep only this rank's part of the
sequence for backward and all-gather it again there for their weights' gradients: two more
all-gathers per layer (tp_gathered_linear.py). Not under the zero-bubble schedule, whose
deferred weight pass keeps the gathered input instead (`regathered=False`), nor in llama's
blocks, whose q, k, v (gate, up) share one gather and keep its output (`regathered=False`).

Beyond the layers: the vocabulary-parallel embedding sums its rows' lookups (forward) and the
head sums the hidden states' gradient (backward), one tensor each; and the cross-entropy
all-reduces three fp32 values per token (max, sum of exponentials, target logit).
"""

from __future__ import annotations

LOSS_VALUES_PER_TOKEN = 3
REGATHERS_PER_LAYER = 2  # under SP: attention's qkv and the MLP's fc, in backward


def tp_step_bytes(n_layers: int, tokens: int, d_model: int, sequence_parallel: bool, element_size: int = 4,
                  embedding: bool = True, head: bool = True, regathered: bool = True) -> dict[str, int]:
    """Bytes per kind of collective for `tokens` tokens (the step's, on one rank) through
    `n_layers` layers, with the embedding and the head if this rank holds them, counted at
    each collective's whole tensor (as `TensorParallel` counts). Only for tp > 1: at tp = 1
    nothing is sent. `regathered`: whether, under sequence parallelism, the column-parallel
    layers gather their input again in backward."""
    activation = tokens * d_model * element_size
    collectives = 4 * n_layers + int(embedding) + int(head)
    counted = {"all_reduce": LOSS_VALUES_PER_TOKEN * tokens * 4 if head else 0}
    if sequence_parallel:
        counted["reduce_scatter"] = collectives * activation
        counted["all_gather"] = (collectives + REGATHERS_PER_LAYER * n_layers * int(regathered)) * activation
    else:
        counted["all_reduce"] += collectives * activation
    return {kind: value for kind, value in counted.items() if value}
