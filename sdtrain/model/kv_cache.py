"""The keys and values of the tokens already decoded, so that each new token attends to them
instead of the whole sequence being run again (what `sdtrain generate` uses; training never does).

One `LayerCache` per attention module: k and v preallocated at [batch, kv_heads, max_len,
head_dim] and the count of positions filled. The prompt goes in as one forward that fills the
first positions; every later forward adds one token. `KVCache` holds a model's layer caches by
block name and says at which absolute position the next token stands (learned positions and
rotary embeddings both take it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LayerCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.k = torch.empty(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa) -> torch.Tensor:
        """Causal attention of the new tokens' q [B, H, T, hd] over every token so far, after
        the new k and v [B, Hkv, T, hd] are stored. `sdpa`: further arguments of
        scaled_dot_product_attention (e.g. enable_gqa)."""
        past, T = self.length, q.size(2)
        if past + T > self.k.size(2):
            raise ValueError(f"the cache holds {self.k.size(2)} positions; {past} + {T} do not fit")
        self.k[:, :, past:past + T] = k
        self.v[:, :, past:past + T] = v
        self.length = past + T
        keys, values = self.k[:, :, :self.length], self.v[:, :, :self.length]
        if T == 1:  # one new token sees every earlier one: no mask at all
            return F.scaled_dot_product_attention(q, keys, values, **sdpa)
        if past == 0:  # the prompt, filling an empty cache: plain causal attention
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, **sdpa)
        # Several new tokens after earlier ones: token t sees the past and new tokens up to itself.
        mask = torch.ones(T, self.length, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **sdpa)


class KVCache:
    """A whole model's layer caches, keyed by block name (`"0"`, `"1"`, ...)."""

    def __init__(self, layers: dict[str, LayerCache]):
        self.layers = layers

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> KVCache:
        """Caches shaped for `model`'s attention modules (`n_kv_heads` where the module has
        grouped-query attention, else `n_heads`), in its parameters' dtype and device."""
        param = next(model.parameters())
        layers = {}
        for name, block in model.blocks.items():
            attn = block.attn
            heads = getattr(attn, "n_kv_heads", attn.n_heads)
            head_dim = model.cfg.d_model // model.cfg.n_heads
            layers[name] = LayerCache(batch, heads, max_len, head_dim, param.dtype, param.device)
        return cls(layers)

    @property
    def position(self) -> int:
        """The absolute position of the next token (the tokens every layer holds)."""
        return next(iter(self.layers.values())).length
