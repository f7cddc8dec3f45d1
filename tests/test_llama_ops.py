"""llama_ops.py's written-out backward against torch's composite forms: the same values and
gradients (float32, to rounding), the exact derivative (gradcheck in float64), and torch's own
path wherever the written-out one does not apply (autocast, bfloat16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.model.llama_ops import RMSNorm, _RMSNormFunction, _RotaryFunction, apply_rope, rotate_half
from sdtrain.model.llama import rope_tables


def composite_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def tables(T: int, head_dim: int, dtype=torch.float32):
    cos, sin = rope_tables(torch.arange(T), head_dim, 10000.0)
    return cos.to(dtype), sin.to(dtype)


def test_rms_norm_equals_torchs_forward_and_backward():
    torch.manual_seed(0)
    ours, theirs = RMSNorm(48, eps=1e-5), nn.RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 10, 48, requires_grad=True)
    g = torch.randn(3, 10, 48)
    y = ours(x)
    assert y.grad_fn.name().endswith("_RMSNormFunctionBackward")  # the written-out path ran
    gx, gw = torch.autograd.grad(y, [x, ours.weight], g)
    ry = theirs(x)
    rx, rw = torch.autograd.grad(ry, [x, theirs.weight], g)
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


def test_rotary_equals_the_composite_on_attentions_transposed_layout():
    torch.manual_seed(0)
    B, T, H, hd = 2, 12, 3, 16
    # as attention makes q: (B, T, H, hd) viewed as (B, H, T, hd), not contiguous
    x = torch.randn(B, T, H, hd).transpose(1, 2).requires_grad_()
    cos, sin = tables(T, hd)
    g = torch.randn(B, H, T, hd)
    y = apply_rope(x, cos, sin)
    assert y.grad_fn.name().endswith("_RotaryFunctionBackward")
    (gx,) = torch.autograd.grad(y, x, g)
    ry = composite_rope(x, cos, sin)
    (rx,) = torch.autograd.grad(ry, x, g)
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)


def test_the_written_out_backwards_are_the_exact_derivatives():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-5), (x, w))
    cos, sin = tables(5, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a: _RotaryFunction.apply(a, cos, sin[..., :4]), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_other_precisions_keep_torchs_own_path(dtype):
    norm = RMSNorm(16).to(dtype)
    x = torch.randn(4, 16, dtype=dtype, requires_grad=True)
    y = norm(x)
    assert "_RMSNormFunction" not in y.grad_fn.name()
    torch.testing.assert_close(y, F.rms_norm(x, (16,), norm.weight, norm.eps))
    cos, sin = tables(4, 16)
    q = torch.randn(1, 1, 4, 16, dtype=dtype, requires_grad=True)
    assert "_RotaryFunction" not in apply_rope(q, cos, sin).grad_fn.name()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x32 = torch.randn(4, 16, requires_grad=True)
        assert "_RMSNormFunction" not in RMSNorm(16)(x32).grad_fn.name()
