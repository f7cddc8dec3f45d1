"""A decoder-only Transformer, a plain nn.Module with nothing distributed inside.

GPT-2 (`arch: gpt2`): embeddings -> pre-LN blocks (causal self-attention, GELU MLP) -> final
LayerNorm -> output head tied to the token embedding. LLaMA (`arch: llama`): the same frame
with llama.py's blocks (RMSNorm, rotary positions, grouped-query attention, SwiGLU), no
position embedding, an RMSNorm at the end and a head of its own unless `tie_embeddings`.
Attention goes through scaled_dot_product_attention, which picks the flash /
memory-efficient kernel on CUDA. The loss is computed outside the forward (HeadLoss): with
`loss_chunk_tokens` the head and the loss go a chunk of tokens at a time (chunked_loss.py),
never making all the logits. A GPT may be one pipeline stage's part.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.model.chunked_loss import chunked_cross_entropy
from sdtrain.model.kv_cache import KVCache, LayerCache
from sdtrain.model.llama import LlamaBlock
from sdtrain.model.llama_ops import RMSNorm
from sdtrain.model.moe.layer import MoEMLP, MoESettings
from sdtrain.model.rope_scaling import RopeScaling
from sdtrain.model.size import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, has_bias, kv_heads, mlp_width, ties_embeddings

NORMS = (nn.LayerNorm, nn.RMSNorm)


@dataclass(frozen=True)
class GPTConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    seq_len: int = 128
    vocab_size: int = 256
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool | None = None  # None: true for gpt2, false for llama
    moe: MoESettings | None = None  # None: a dense model
    arch: str = "gpt2"  # gpt2 | llama
    n_kv_heads: int | None = None  # None: n_heads (llama's grouped-query attention)
    rope_theta: float | None = None  # llama's rotary base; None: 10000
    rope_scaling: RopeScaling | None = None  # llama: Llama 3's scaling of the long wavelengths (rope_scaling.py)
    ffn_hidden: int | None = None  # llama's SwiGLU width; None: LLaMA's rounding of 8/3 d
    tie_embeddings: bool | None = None  # None: true for gpt2, false for llama
    norm_eps: float | None = None  # None: 1e-5
    activation: str = "gelu"  # gpt2's MLP: gelu (exact) or gelu_tanh (the approximation GPT-2 was trained with)
    init_from: str | None = None  # a Hugging Face folder whose weights replace the first ones (hf_import.py)

    def __post_init__(self):
        # The defaults that depend on the architecture, resolved once (size.py's rules, which
        # planning without torch follows too): every field of a built model is a value.
        resolved = {"bias": has_bias(self), "n_kv_heads": kv_heads(self), "tie_embeddings": ties_embeddings(self),
                    "norm_eps": self.norm_eps or DEFAULT_NORM_EPS}
        if self.arch == "llama":
            resolved.update(ffn_hidden=mlp_width(self), rope_theta=self.rope_theta or DEFAULT_ROPE_THETA)
        resolved["rope_scaling"] = RopeScaling.of(self.rope_scaling)  # a recipe's section, read once
        for key, value in resolved.items():
            object.__setattr__(self, key, value)
        # The recipe's model section gives its MoE settings as fields (a dict, or a JSON
        # recipe's): read once into the layer's own type here, num_experts 0 meaning dense.
        moe = self.moe
        if moe is not None and not isinstance(moe, MoESettings):
            fields = moe if isinstance(moe, Mapping) else moe.model_dump()
            object.__setattr__(self, "moe", MoESettings(**fields) if fields.get("num_experts") else None)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        # Shapes come from qkv's output and n_heads, not from x: tensor parallelism leaves a
        # rank a slice of the heads (qkv holding their q, k and v; n_heads their count), and
        # under sequence parallelism x is a part of the sequence that qkv gathers whole.
        qkv = self.qkv(x)
        B, T, _ = qkv.shape
        q, k, v = qkv.chunk(3, dim=-1)
        # (B, T, heads x head_dim) -> (B, heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        else:  # decoding: the new tokens attend to every earlier one as well
            y = cache.attend(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, moe: MoESettings | None = None):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MoEMLP(cfg.d_model, cfg.mlp_ratio * cfg.d_model, moe) if moe is not None else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), cache))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


class HeadLoss(nn.Module):
    """The output head and the mean cross-entropy over tokens, outside the model's forward
    (a pipeline's last stage computes it; a module, so a strategy can hook it). With
    `chunk_tokens` the logits are made a chunk of tokens at a time, never all at once."""

    def __init__(self, chunk_tokens: int = 0):
        super().__init__()
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden, targets = hidden.flatten(0, 1), targets.reshape(-1)
        if self.chunk_tokens:
            return chunked_cross_entropy(hidden, weight, targets, self.chunk_tokens)
        return F.cross_entropy(F.linear(hidden, weight).float(), targets)


class GPT(nn.Module):
    """The whole model, or one pipeline stage's part of it: the blocks of `layers` (global
    indices, which stay their names: a checkpoint key is `blocks.7.…` wherever block 7 runs),
    the embeddings if `first`, the final norm and output head if `last`. Tied (gpt2's
    default), the head of a whole model is the token embedding; on a last stage without the
    embedding it is a copy, kept equal to it by the pipeline. Untied (llama's), the head is a
    parameter of its own everywhere. The blocks are `cfg.arch`'s."""

    def __init__(self, cfg: GPTConfig, seed: int = 0, loss_chunk_tokens: int = 0,
                 layers: list[int] | None = None, first: bool = True, last: bool = True):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        layers = range(cfg.n_layers) if layers is None else layers
        llama = cfg.arch == "llama"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model) if first else None
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if first and not llama else None
        self.drop = nn.Dropout(cfg.dropout)
        moe, block = cfg.moe, LlamaBlock if llama else Block
        self.blocks = nn.ModuleDict({str(i): block(cfg, moe if moe and moe.is_moe_layer(i) else None) for i in layers})
        # The global index of each experts module's first expert (expert parallelism keeps a
        # slice of them on each rank): an expert's first value depends on that index only.
        self.first_expert: dict[str, int] = {}
        final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps) if llama else \
            nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.ln_f = final_norm if last else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if last else None
        self.head_loss = HeadLoss(loss_chunk_tokens) if last else None
        if first and last and cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # tied: one matrix to embed and to predict
        self.layer_norms = {name for name, m in self.named_modules() if isinstance(m, NORMS)}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if not p.is_meta:  # on the meta device the weights are made later, in pieces
                    self.initial_value(name, p)

    def initial_value(self, name: str, out: torch.Tensor) -> None:
        """Write parameter `name`'s first value into `out`.

        Each weight draws from its own generator, seeded by (seed, name): its first value
        depends neither on the order nor on the place in which weights are made (here whole,
        or by ZeRO one flat unit at a time out of a meta-device model), so every strategy
        starts from the same weights. A stage's own copy of the tied head starts as the
        token embedding does; an untied head draws its own."""
        if name == "lm_head.weight" and self.cfg.tie_embeddings:
            name = "tok_emb.weight"
        module, _, kind = name.rpartition(".")
        if module.endswith(".experts"):
            self._initial_experts(name, module, out)
        elif module in self.layer_norms:
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

    def _initial_experts(self, name: str, module: str, out: torch.Tensor) -> None:
        """One generator per (seed, name, global expert index): the same expert starts the
        same whichever rank holds it. w2 is a residual projection (GPT-2's scaled std)."""
        std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("w2") else 0.02
        first = self.first_expert.get(module, 0)
        for local in range(out.shape[0]):
            seed = zlib.crc32(f"{self.seed}/{name}/{first + local}".encode())
            out[local].normal_(0.0, std, generator=torch.Generator(out.device).manual_seed(seed))

    def forward(self, x: torch.Tensor, layers: list[str] | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Token ids or hidden states in; hidden states out. `layers`: run only these blocks
        (one pipeline chunk of the part): the embeddings run before block 0 and the final
        norm after the last block, on the part that has them. `cache` (decoding, whole model):
        x are the tokens after those the cache holds, at the positions that follow them."""
        embeds = self.tok_emb is not None and (layers is None or layers[0] == "0")
        final = self.ln_f is not None and (layers is None or layers[-1] == str(self.cfg.n_layers - 1))
        if embeds:
            start = 0 if cache is None else cache.position
            T = start + x.size(1)
            if T > self.cfg.seq_len:
                raise ValueError(f"sequence of {T} tokens is longer than seq_len {self.cfg.seq_len}")
            x = self.tok_emb(x)
            if self.pos_emb is not None:  # llama's positions are rotary, inside attention
                x = x + self.pos_emb(torch.arange(start, T, device=x.device))
            x = self.drop(x)
        for key in self.blocks if layers is None else layers:
            x = self.blocks[key](x) if cache is None else self.blocks[key](x, cache.layers[key])
        return self.ln_f(x) if final else x

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over tokens of the final hidden states."""
        return self.head_loss(hidden, self.lm_head.weight, targets)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def num_params(self, include_position_embedding: bool = True) -> int:
        """Exact count of distinct parameters (a tied head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if include_position_embedding or self.pos_emb is None:
            return n
        return n - self.pos_emb.weight.numel()
