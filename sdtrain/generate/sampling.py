"""The choice of the next token from the logits: greedy at temperature 0, else a draw from the
softmax at `temperature` over the `top_k` most likely tokens, from a seeded generator (the
same seed gives the same tokens)."""

from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature: float = 1.0, top_k: int = 0, seed: int = 0, vocab_size: int | None = None):
        """`vocab_size`: the tokens the vocabulary can write (a model may have more ids than its
        tokenizer; training never showed it those, so they are never chosen)."""
        self.temperature, self.top_k, self.vocab_size = temperature, top_k, vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] of the last position -> the next token ids [B, 1]."""
        logits = logits[:, :self.vocab_size].float()
        if self.temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        # Shifted so the largest is 0 before the division: a tiny temperature gives -inf, never NaN.
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / self.temperature
        if self.top_k and self.top_k < logits.size(-1):
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        # Drawn on the CPU generator whatever the model's device: a seed means the same tokens anywhere.
        return torch.multinomial(probs.cpu(), 1, generator=self.generator).to(logits.device)
