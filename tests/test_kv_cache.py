"""The KV cache: a model fed its tokens in pieces through the cache computes what one forward
over the whole sequence does, and training's forward (no cache) is untouched."""

from __future__ import annotations

import pytest
import torch

from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.model.kv_cache import KVCache

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=48, vocab_size=256)
# llama: rotary positions at the cache's absolute position, grouped-query attention (2 kv heads of 4)
LLAMA = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=48, vocab_size=256, arch="llama", n_kv_heads=2)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_pieces_through_the_cache_equal_one_forward(cfg):
    model = GPT(cfg, seed=5).eval()
    tokens = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(tokens)
        cache = KVCache.for_model(model, batch=2, max_len=30)
        # a prompt (empty cache), several tokens after it (a masked block), then one at a time
        pieces = [model(tokens[:, :7], cache=cache), model(tokens[:, 7:12], cache=cache)]
        pieces += [model(tokens[:, t:t + 1], cache=cache) for t in range(12, 30)]
    assert cache.position == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-5)


def test_a_llama_cache_holds_only_the_kv_heads():
    cache = KVCache.for_model(GPT(LLAMA), batch=1, max_len=10)
    assert tuple(cache.layers["0"].k.shape) == (1, 2, 10, 8)


def test_the_cache_refuses_positions_past_its_length_and_seq_len():
    model = GPT(CFG, seed=5).eval()
    cache = KVCache.for_model(model, batch=1, max_len=4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        try:
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        except ValueError as exc:
            assert "4 positions" in str(exc)
        else:
            raise AssertionError("a fifth token went into a cache of 4")
    cache = KVCache.for_model(model, batch=1, max_len=64)
    with torch.no_grad():
        model(torch.zeros(1, 48, dtype=torch.long), cache=cache)
        try:
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)  # position 48: no learned position for it
        except ValueError as exc:
            assert "seq_len 48" in str(exc)
        else:
            raise AssertionError("a token past seq_len was decoded")
