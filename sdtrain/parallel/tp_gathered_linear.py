"""A column-parallel layer's product under sequence parallelism, keeping only this rank's part
of the sequence for backward (Korthikanti et al. 2022, section 4.2.2; Megatron-LM's
`LinearWithGradAccumulationAndAsyncCommunication`).

Forward: all-gather the sequence, then the rank's columns of the product, as
`gather_sequence` followed by `F.linear` would. Backward: the input's gradient needs only the
weight (reduce-scattered, as `gather_sequence`'s backward does); the weight's gradient needs
the whole input, gathered again here rather than kept. The products are the ones autograd
runs for `F.linear` (`g @ W` and `g^T @ x`), so the gradients are the same numbers; the cost
is one more all-gather per layer in backward (counted as one, see tp_volume.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdtrain.parallel.tp_collectives import TensorParallel


class _GatheredLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, weight, bias, tp):
        ctx.tp, ctx.has_bias = tp, bias is not None
        device = shard.device.type
        # under autocast F.linear runs in its dtype; backward (outside autocast) casts as it did
        ctx.compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(shard, weight)
        return F.linear(tp.gather_sequence(shard), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        shard, weight = ctx.saved_tensors
        tp, dtype = ctx.tp, ctx.compute_dtype
        need_input, need_weight, need_bias, _ = ctx.needs_input_grad
        compute_weight = weight if dtype is None else weight.to(dtype)
        g = grad.reshape(-1, grad.size(-1))
        grad_shard = grad_weight = grad_bias = None
        if need_weight:  # the re-gather runs while the input's gradient is computed
            whole, gathering = tp.start_gather_sequence(shard)
        if need_input:
            whole_grad = g.mm(compute_weight).view(*grad.shape[:-1], weight.size(1)).to(shard.dtype)
            grad_shard = tp.reduce_scatter_sequence(whole_grad)  # fresh: may be summed in place
        if need_weight:
            gathering.wait()
            x = whole.reshape(-1, whole.size(-1))
            grad_weight = g.t().mm(x if dtype is None else x.to(dtype)).to(weight.dtype)
        if ctx.has_bias and need_bias:
            grad_bias = grad.sum_to_size(grad.size(-1))
        return grad_shard, grad_weight, grad_bias, None


def gathered_linear(shard: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    tp: TensorParallel) -> torch.Tensor:
    """`F.linear(gather_sequence(shard, tp), weight, bias)`, keeping `shard` for backward."""
    return _GatheredLinear.apply(shard, weight, bias, tp)
