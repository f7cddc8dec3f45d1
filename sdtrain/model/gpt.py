"""A decoder-only Transformer (GPT-2 style), a plain nn.Module with nothing distributed inside.

Embeddings -> pre-LN blocks (causal self-attention, GELU MLP) -> final LayerNorm -> output
head tied to the token embedding. Attention goes through scaled_dot_product_attention,
which picks the flash / memory-efficient kernel on CUDA.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    vocab_size: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one matrix to embed and to predict
        self.layer_norms = {name for name, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not p.is_meta:  # on the meta device the weights are made later, in pieces
                    self.initial_value(name, p)

    def initial_value(self, name: str, out: torch.Tensor) -> None:
        """Write parameter `name`'s first value into `out`.

        Each weight draws from its own generator, seeded by (seed, name): its first value
        depends neither on the order nor on the place in which weights are made (here whole,
        or by ZeRO one flat unit at a time out of a meta-device model), so every strategy
        starts from the same weights."""
        module, _, kind = name.rpartition(".")
        if module in self.layer_norms:
            out.fill_(1.0 if kind == "weight" else 0.0)
        elif kind == "bias":
            out.zero_()
        else:
            # GPT-2: residual projections get std / sqrt(2 * n_layers) so that the residual
            # stream's variance does not grow with depth.
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
            # (The CPU generator keeps only 32 bits of a seed, hence one 32-bit hash of both.)
            generator = torch.Generator(out.device).manual_seed(zlib.crc32(f"{self.seed}/{name}".encode()))
            out.normal_(0.0, std, generator=generator)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position; with targets, also the mean cross-entropy over tokens."""
        T = idx.size(1)
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, include_position_embedding: bool = True) -> int:
        """Exact count of distinct parameters (the tied head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n if include_position_embedding else n - self.pos_emb.weight.numel()
