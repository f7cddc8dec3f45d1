"""LLaMA's two elementwise pieces, RMSNorm and the rotary embedding, with their backward
written out: the same numbers as torch's composite versions (to rounding), in a fraction of
the operations.

On CPU `F.rms_norm` is a chain of seven small operations (square, mean, add, rsqrt, two
multiplies, a cast), each recorded by autograd with what it saves, and its backward about
twice that; the rotary embedding, written as `x * cos + rotate_half(x) * sin`, records a
chunk, a negation, a concatenation and three arithmetic operations. At llama-tiny's size
(d 128, 1,024 tokens a micro-batch) those small operations are a real share of a step: the
matmuls are small too. Here RMSNorm's backward is the closed form (three passes over the
input), and the rotation is one multiply and two in-place multiply-adds on the halves, forward
and backward, using that channels j and j + head_dim/2 share an angle (sin's halves are equal).

torch.compile traces the composite forms instead (inductor fuses them better than this), and
anything but float32 without autocast takes them too, so mixed precision keeps torch's own
casting rules.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _written_out(x: torch.Tensor) -> bool:
    """Whether to take the hand-written backward: eager float32 outside autocast."""
    return (x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
            and not torch.compiler.is_compiling())


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * rstd(x) * w: rstd * (g w - normed * mean(g w normed))
            grad_normed = grad * weight
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).reshape(-1, normed.size(-1)).sum(0)
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (its parameter, its name in checkpoints) with the written-out backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or len(self.normalized_shape) != 1 or not _written_out(x) \
                or self.weight.dtype != torch.float32:
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


def _turn(x: torch.Tensor, cos: torch.Tensor, sin_half: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + sign * (-second, first) * sin, halves along the last dimension: sign 1 turns
    forward (rotate_half), -1 is its transpose (backward)."""
    half = x.size(-1) // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin_half, value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin_half, value=sign)
    return out


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin_half):
        ctx.save_for_backward(cos, sin_half)
        return _turn(x, cos, sin_half, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin_half = ctx.saved_tensors
        return _turn(grad, cos, sin_half, -1.0), None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos, sin: [T, head_dim], each half of a row the same angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if not _written_out(x) or cos.requires_grad or sin.requires_grad:
        return x * cos + rotate_half(x) * sin
    return _RotaryFunction.apply(x, cos, sin[..., : sin.size(-1) // 2])
