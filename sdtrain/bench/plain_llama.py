"""A LLaMA written plainly in PyTorch, as a user would write it in one file (nanoGPT's way,
torchtitan's layers): the bench's `plain` peer trains it beside sdtrain's llama, so the ratio
shows what sdtrain's model and trainer cost against a model that knows nothing of sdtrain.

The same architecture and shape as sdtrain's llama blocks (model/llama.py), imported from
nowhere in sdtrain: RMSNorm (torch's), rotary embedding on channel pairs (j, j + hd/2) from
tables kept as buffers, grouped-query attention through scaled_dot_product_attention with
enable_gqa, SwiGLU, no biases, an untied head unless the recipe ties it. Its first weights are
drawn the usual way (one generator, N(0, 0.02)); only the speed is compared.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def ffn_width(model: dict) -> int:
    if model.get("ffn_hidden"):
        return model["ffn_hidden"]
    hidden = int(2 * 4 * model["d_model"] / 3)
    return 256 * ((hidden + 255) // 256)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.wq = nn.Linear(d, heads * self.hd, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def rope(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-b, a), dim=-1) * sin


class FeedForward(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
        self.attention, self.feed_forward = Attention(d, heads, kv_heads), FeedForward(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class PlainLlama(nn.Module):
    """Token ids in, logits out."""

    def __init__(self, model: dict):
        super().__init__()
        d, heads, layers = model["d_model"], model["n_heads"], model["n_layers"]
        kv_heads, eps = model.get("n_kv_heads") or heads, model.get("norm_eps") or 1e-5
        self.tok_embeddings = nn.Embedding(model["vocab_size"], d)
        self.layers = nn.ModuleList(TransformerBlock(d, heads, kv_heads, ffn_width(model), eps) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=eps)
        self.output = nn.Linear(d, model["vocab_size"], bias=False)
        if model.get("tie_embeddings"):
            self.output.weight = self.tok_embeddings.weight
        hd, theta = d // heads, model.get("rope_theta") or 10000.0
        angles = torch.arange(model["seq_len"], dtype=torch.float32)[:, None] * \
            theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        T = idx.size(1)
        x = self.tok_embeddings(idx)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))
