"""Megatron's two parallel linear layers, as nn.Linear subclasses holding this rank's piece of
the weight (so parameter names, and checkpoint keys, are the whole model's).

A column-parallel layer holds some of the output features (rows of the weight, and of the
bias): from the whole input it makes its part of the output, no communication in between.
A row-parallel layer holds the matching input features (columns of the weight): from its
part of the input it makes a partial output, summed over the ranks; its bias is whole and
added once, after the sum. A column-parallel layer followed by a row-parallel one (attention's
qkv and proj, the MLP's fc and proj) so costs one collective forward and one backward.

Under sequence parallelism a column-parallel layer keeps for backward only this rank's part of
the sequence and gathers the whole input again there, for its weight's gradient (Megatron-LM's
`LinearWithGradAccumulationAndAsyncCommunication`, Korthikanti et al. 2022 section 4.2.2): one
more all-gather per layer and backward, for a rank's saved input 1/T of the whole.

`record_local`, when set (weight_grads.py's split backward), is called with the local product's
input and output: the whole input of a column-parallel layer (after its gather), the partial
output of a row-parallel one (before its sum). A forward hook sees the layer's outside, whose
shapes differ under sequence parallelism.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.parallel.tp_collectives import TensorParallel, into_tp_region, out_of_tp_region
from sdtrain.parallel.tp_gathered_linear import gathered_linear


class _PieceOfLinear(nn.Linear):
    """An nn.Linear holding this rank's piece of the weight (so checkpoint keys and the
    zero-bubble recorder, which looks for nn.Linear, see no difference). `record_local`: the
    split backward's hook, given what the W pass needs of this layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.tp = tp
        self.record_local = None


class ColumnParallelLinear(_PieceOfLinear):
    """`input_in_tp_region`: the input comes already through `into_tp_region`, taken once for
    several layers that read the same input (llama's q, k and v; its SwiGLU's gate and up), so
    that they share one gather (one all-reduce of the input's gradient) instead of one each."""

    input_in_tp_region = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_in_tp_region:
            y = F.linear(x, self.weight, self.bias)
            if self.record_local is not None:
                self.record_local(self, x, y)
            return y
        if self.tp.sequence_parallel and self.record_local is None:
            return gathered_linear(x, self.weight, self.bias, self.tp)
        # The split backward's W pass needs the whole input later, outside autograd: it keeps
        # the gathered input (T times the memory of the re-gathering path above).
        x = into_tp_region(x, self.tp)
        y = F.linear(x, self.weight, self.bias)
        if self.record_local is not None:
            self.record_local(self, x, y)
        return y


class RowParallelLinear(_PieceOfLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.record_local is not None:
            self.record_local(self, x, partial)
        y = out_of_tp_region(partial, self.tp)
        return y if self.bias is None else y + self.bias
