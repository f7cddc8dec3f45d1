"""The decoding loop: the prompt runs as one forward that fills the KV cache, then each new
token runs alone at the next position. Without the cache (`use_cache=False`, the reference the
tests and the benchmark compare with) the whole sequence runs again for every token."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from sdtrain.model.kv_cache import KVCache


@torch.no_grad()
def generate_tokens(model, prompt: list[int], max_new_tokens: int, sample: Callable[[torch.Tensor], torch.Tensor],
                    use_cache: bool = True) -> Iterator[int]:
    """Yield `max_new_tokens` token ids after `prompt`, one as soon as it is chosen. The caller
    keeps prompt + new tokens within the model's seq_len (positions past it have no meaning)."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = KVCache.for_model(model, batch=1, max_len=len(prompt) + max_new_tokens) if use_cache else None
    hidden = model(ids, cache=cache)
    for produced in range(max_new_tokens):
        token = sample(model.logits(hidden[:, -1]))
        yield int(token)
        if produced + 1 == max_new_tokens:
            return
        if use_cache:
            hidden = model(token, cache=cache)
        else:
            ids = torch.cat([ids, token], dim=1)
            hidden = model(ids)
