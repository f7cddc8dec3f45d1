"""LLaMA's block (Touvron et al. 2023), a plain nn.Module like gpt.py's: pre-norm RMSNorm,
rotary position embedding on q and k, grouped-query attention, SwiGLU MLP, no biases.

The GPT class builds these blocks when `cfg.arch` is llama (gpt.py), so every strategy that
takes the GPT takes them: their names are the spec's (`attn.q`, `attn.k`, `attn.v`,
`attn.proj`, `mlp.gate`, `mlp.up`, `mlp.proj`, `ln_attn`, `ln_mlp`), which is also what
Hugging Face's names map onto one to one.

Rotary embedding follows Hugging Face's `rotate_half` convention: channel j of a head turns
with channel j + head_dim/2, at frequency theta^(-2j/head_dim), tables made in float32.
Attention is scaled_dot_product_attention with `enable_gqa`: k and v keep their n_kv_heads
heads and are never repeated in memory. RMSNorm and the rotation have their backward written
out (llama_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.model.kv_cache import LayerCache
from sdtrain.model.llama_ops import RMSNorm, apply_rope
from sdtrain.model.moe.layer import MoEMLP
from sdtrain.model.rope_scaling import RopeScaling, scaled_inv_freq


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [len(positions), head_dim], in float32, for the global `positions` of
    the tokens (a token's place in the whole sequence); `scaling`: Llama 3's (rope_scaling.py)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # channel j and j + head_dim/2 share a frequency
    return angles.cos(), angles.sin()


class RotaryTables:
    """The cos/sin tables of positions start..end-1, cut from one table per device that is
    made once (longer when a longer sequence asks) and reused by every step. Not a buffer: a
    model built on the meta device (ZeRO) has no values to keep, and a table is cheaper to
    make than to checkpoint. A position's row does not depend on the table's length."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.made: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        made = self.made.get(device)
        if made is None or made[0].size(0) < end:
            with torch.inference_mode(False):  # made under an eval's inference mode, still usable in training
                made = self.made[device] = rope_tables(torch.arange(end, device=device), self.head_dim, self.theta,
                                                         self.scaling)
        return made[0][start:end], made[1][start:end]


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        head_dim = cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * head_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_heads * head_dim, cfg.d_model, bias=False)
        self.rotary = RotaryTables(head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, heads x head_dim) -> (B, heads, T, head_dim)
        q = self.q(x).view(B, T, self.n_heads, -1).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, -1).transpose(1, 2)
        start = 0 if cache is None else cache.length  # decoding: the tokens after those cached
        cos, sin = self.rotary(start, start + T, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
        else:
            y = cache.attend(q, k, v, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg, moe=None):
        super().__init__()
        self.ln_attn = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.ln_mlp = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # With experts (Mixtral's block): SwiGLU experts of the dense MLP's width
        self.mlp = SwiGLU(cfg) if moe is None else MoEMLP(cfg.d_model, cfg.ffn_hidden, moe, swiglu=True)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cache))
        return x + self.drop(self.mlp(self.ln_mlp(x)))
