"""Megatron's two parallel linear layers, as nn.Linear subclasses holding this rank's piece of
the weight (so parameter names, and checkpoint keys, are the whole model's).

A column-parallel layer holds some of the output features (rows of the weight, and of the
bias): from the whole input it makes its part of the output, no communication in between.
A row-parallel layer holds the matching input features (columns of the weight): from its
part of the input it makes a partial output, summed over the ranks; its bias is whole and
added once, after the sum. A column-parallel layer followed by a row-parallel one (attention's
qkv and proj, the MLP's fc and proj) so costs one collective forward and one backward.

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


class ColumnParallelLinear(nn.Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.tp = tp
        self.record_local = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = into_tp_region(x, self.tp)
        y = F.linear(x, self.weight, self.bias)
        if self.record_local is not None:
            self.record_local(self, x, y)
        return y


class RowParallelLinear(nn.Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.tp = tp
        self.record_local = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        if self.record_local is not None:
            self.record_local(self, x, partial)
        y = out_of_tp_region(partial, self.tp)
        return y if self.bias is None else y + self.bias
