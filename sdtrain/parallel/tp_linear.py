"""Megatron's two parallel linear layers, as nn.Linear subclasses holding this rank's piece of
the weight (so parameter names, and checkpoint keys, are the whole model's).

A column-parallel layer holds some of the output features (rows of the weight, and of the
bias): from the whole input it makes its part of the output, no communication in between.
A row-parallel layer holds the matching input features (columns of the weight): from its
part of the input it makes a partial output, summed over the ranks; its bias is whole and
added once, after the sum. A column-parallel layer followed by a row-parallel one (attention's
qkv and proj, the MLP's fc and proj) so costs one collective forward and one backward.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(into_tp_region(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TensorParallel):
        super().__init__(weight.size(1), weight.size(0), bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = out_of_tp_region(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias
