"""The experts of one MoE MLP as 3-D weights, computed together: one batched matmul over
all local experts on their capacity-padded token buffers, no Python loop per expert.

w1 [E_local, d, hidden] and w2 [E_local, hidden, d] hold experts first_expert ..
first_expert + E_local - 1 of the layer's E (all of them without expert parallelism). The
experts have no biases, so a buffer's padding rows (zeros) stay zeros and cost no gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts  # E, of the whole layer
        self.first_expert = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        # Under expert parallelism a rank's expert gradient sums the contributions of the
        # tokens of all ep ranks; averaging it over the ranks that hold the same experts
        # (ep times fewer than the data-parallel ranks) needs it divided by ep first.
        self.grad_scale = 1.0

    @property
    def local_experts(self) -> int:
        return self.w1.shape[0]

    def keep(self, first: int, count: int) -> None:
        """Hold only experts first .. first+count-1 (expert parallelism, applied from outside)."""
        self.first_expert = first
        for name in ("w1", "w2"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old.detach()[first : first + count].clone(), requires_grad=old.requires_grad)
                    if not old.is_meta else nn.Parameter(torch.empty((count, *old.shape[1:]), device="meta")))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [E_local, N, d] (N tokens per expert, padded) -> [E_local, N, d]."""
        w1, w2 = self.w1, self.w2
        if self.grad_scale != 1.0:
            w1, w2 = ScaleGrad.apply(w1, self.grad_scale), ScaleGrad.apply(w2, self.grad_scale)
        return torch.bmm(F.gelu(torch.bmm(tokens, w1.to(tokens.dtype))), w2.to(tokens.dtype))
