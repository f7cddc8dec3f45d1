"""A prompt in, text out a piece at a time: the prompt is checked against the model's
context, tokens are drawn (sampling.py) through the KV cache (decode.py) and turned back into
text as each one arrives (vocab.py). Decoding stops when prompt + new tokens reach the model's
seq_len: it does not slide the context (the model has no position past seq_len, and a sliding
window would have to run the whole window again for every token)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from sdtrain.errors import UserInputError
from sdtrain.generate.decode import generate_tokens
from sdtrain.generate.sampling import Sampler
from sdtrain.generate.vocab import safe_for_terminal


class Generation:
    def __init__(self, model, vocab, prompt: str, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0, use_cache: bool = True):
        self.model, self.vocab, self.use_cache = model, vocab, use_cache
        self.prompt = prompt
        self.prompt_ids = vocab.encode(prompt)
        seq_len = model.cfg.seq_len
        if not self.prompt_ids:
            raise UserInputError("the prompt is empty once tokenized; give --prompt TEXT (the default is a newline)")
        if len(self.prompt_ids) >= seq_len:
            raise UserInputError(f"the prompt is {len(self.prompt_ids):,} tokens and the model's context (model.seq_len) "
                                 f"is {seq_len:,}: give a prompt of at most {seq_len - 1:,} tokens")
        self.max_new_tokens = min(max_new_tokens, seq_len - len(self.prompt_ids))
        self.stopped_at_seq_len = self.max_new_tokens < max_new_tokens
        self.sampler = Sampler(temperature, top_k, seed, vocab_size=vocab.size)
        self.tokens: list[int] = []
        self.seconds = 0.0  # from the prompt's forward to the last token, decoding only

    def pieces(self) -> Iterator[str]:
        """The prompt, then the text of each new token as soon as it is whole."""
        yield safe_for_terminal(self.prompt)
        stream = self.vocab.stream()
        start = time.perf_counter()
        for token in generate_tokens(self.model, self.prompt_ids, self.max_new_tokens, self.sampler, self.use_cache):
            self.tokens.append(token)
            self.seconds = time.perf_counter() - start
            piece = stream.add(token)
            if piece:
                yield piece
        yield stream.finish()

    def summary(self) -> str:
        rate = len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")
        line = f"{len(self.tokens)} new tokens in {self.seconds:.2f} s ({rate:,.1f} tokens/s)"
        if self.stopped_at_seq_len:
            line += f"; stopped at the model's seq_len {self.model.cfg.seq_len} (prompt {len(self.prompt_ids)} tokens)"
        return line
