"""The experts of one MoE MLP as 3-D weights, computed together: one grouped matmul over
all local experts on their tokens, ragged (each expert's own count, no padding), no Python
loop per expert.

w1 [E_local, d, hidden] and w2 [E_local, hidden, d] hold experts first_expert ..
first_expert + E_local - 1 of the layer's E (all of them without expert parallelism).
GELU experts (gpt2 blocks): gelu(x @ w1) @ w2. SwiGLU experts (llama blocks, Mixtral's):
w3 [E_local, d, hidden] too, and (silu(x @ w1) * (x @ w3)) @ w2.
Tokens arrive sorted by expert, `counts[e]` of them for local expert e: torch's grouped GEMM
(`torch._grouped_mm`, what torchtitan uses; CUTLASS on a Hopper GPU, a loop in C++ on CPU)
multiplies each expert's rows by its own weights. A capacity buffer padded to C rows per
expert would spend E x C rows of compute on what is at most the kept assignments: 20-25 % of
the expert FLOPs at capacity factor 1.25 and top-2, more where the router is unbalanced.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_GROUPED_MM = getattr(torch, "_grouped_mm", None)  # torch >= 2.8; older builds take the loop below


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def _grouped_mm_takes(x: torch.Tensor) -> bool:
    """torch's grouped GEMM takes bf16 everywhere; other dtypes only in the CPU kernel run
    eagerly (its CUDA kernel and its meta function under torch.compile want bf16)."""
    if _GROUPED_MM is None:
        return False
    return x.dtype == torch.bfloat16 or (x.device.type == "cpu" and not torch.compiler.is_compiling())


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, k] sorted by group, counts[g] rows for group g; w [G, k, n] -> [N, n], row i of
    group g times w[g]."""
    if _grouped_mm_takes(x):
        return _GROUPED_MM(x, w, offs=torch.cumsum(counts, 0, dtype=torch.int32))
    # split/unbind rather than slicing w[g]: each slice's backward would allocate a whole
    # zero gradient of w.
    return torch.cat([part @ wg for part, wg in zip(x.split(counts.tolist()), w.unbind(0))])


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, swiglu: bool = False):
        super().__init__()
        self.num_experts = num_experts  # E, of the whole layer
        self.first_expert = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_model, hidden)) if swiglu else None
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
        for name in ("w1", "w2", "w3"):
            old = getattr(self, name)
            if old is None:  # GELU experts have no w3
                continue
            setattr(self, name, nn.Parameter(old.detach()[first : first + count].clone(), requires_grad=old.requires_grad)
                    if not old.is_meta else nn.Parameter(torch.empty((count, *old.shape[1:]), device="meta")))

    @property
    def weights(self) -> list[nn.Parameter]:
        """w1, w2 (and w3 for SwiGLU experts)."""
        return [self.w1, self.w2] + ([] if self.w3 is None else [self.w3])

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens [N, d] sorted by local expert, counts [E_local] (summing to N) -> [N, d]."""
        device = tokens.device.type
        if torch.is_autocast_enabled(device):  # as autocast runs a Linear: in its dtype
            tokens = tokens.to(torch.get_autocast_dtype(device))
        weights = [w if self.grad_scale == 1.0 else ScaleGrad.apply(w, self.grad_scale) for w in self.weights]
        w1, w2, *w3 = (w.to(tokens.dtype) for w in weights)
        if w3:
            hidden = F.silu(grouped_matmul(tokens, w1, counts)) * grouped_matmul(tokens, w3[0], counts)
        else:
            hidden = F.gelu(grouped_matmul(tokens, w1, counts))
        return grouped_matmul(hidden, w2, counts)
