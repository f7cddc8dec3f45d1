"""MoE layers under tensor parallelism: the layer stays whole on every tp rank (router and
experts replicated over tp; experts still split over ep and averaged over edp, whose groups
hold ranks of the same tp rank), and every tp rank routes the whole micro-batch, exactly as
one process does: the same tokens compete for capacity, the same ones drop, the same aux and
z losses. The price is compute: the T ranks of a tp group each run the same experts on the
same tokens (redundant over tp; sharding the experts' width over tp would remove it).

Without sequence parallelism the layer's input is whole and equal on every tp rank, and so
are its output gradients: nothing to do, and its parameters' gradients come out complete
and equal on every tp rank. With it, the input is this rank's part of the sequence, so the
layer is wrapped from outside (hooks: its parameters keep their names):
    y_part = split_sequence(MoE(gather_sequence(x_part)))
- gather: all-gather forward; backward keeps this rank's part of the gradient, which the
  wrapped layer made whole and equal on every rank (no reduce-scatter: a sum would count it
  T times);
- split: keeps this rank's part forward; all-gathers the gradient backward, making the
  whole (complete) output gradient on every rank.
The layer's parameters' gradients are then complete and equal on every tp rank, so they are
not partial sums (TensorParallelPlan.partial_grads leaves them out).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from sdtrain.model.moe.layer import MoEMLP
from sdtrain.parallel.tp_collectives import SEQUENCE_DIM, TensorParallel


class _GatherWholeSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, part, tp):
        ctx.tp = tp
        return tp.gather_sequence(part)

    @staticmethod
    def backward(ctx, grad):
        return _own_part(grad, ctx.tp), None


class _KeepSequencePart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, whole, tp):
        ctx.tp = tp
        return _own_part(whole, tp)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.gather_sequence(grad), None


def _own_part(whole: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return whole[(slice(None),) * SEQUENCE_DIM + (tp.sequence_part(whole.size(SEQUENCE_DIM)),)].contiguous()


def gather_whole_sequence(part: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _GatherWholeSequence.apply(part, tp)


def keep_sequence_part(whole: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    return _KeepSequencePart.apply(whole, tp)


def route_whole_sequence(layer: MoEMLP, tp: TensorParallel) -> None:
    """Under sequence parallelism: the layer sees the whole sequence, returns this rank's part."""
    layer.register_forward_pre_hook(lambda _, args: (gather_whole_sequence(args[0], tp), *args[1:]))
    layer.register_forward_hook(lambda _, args, out: keep_sequence_part(out, tp))


def moe_parameter_names(model: nn.Module) -> set[str]:
    """The parameters of every MoE layer, as the plain model names them."""
    return {f"{prefix}.{name}" for prefix, layer in model.named_modules() if isinstance(layer, MoEMLP)
            for name, _ in layer.named_parameters()}
