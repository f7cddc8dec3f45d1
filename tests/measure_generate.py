"""Measure what the KV cache buys `sdtrain generate`: tokens/s of greedy decoding of 256 new
tokens after a 16-token prompt, with the cache (one token per forward) and without it (the
whole sequence again for every token, as nanoGPT's sample.py does), on a 4-layer, d_model
256 GPT with seq_len 512, in one process, alternating the two and keeping each one's best.

    .venv/bin/python tests/measure_generate.py [--new-tokens 256] [--repeats 3]

Prints one JSON line (tokens/s of each and their ratio); tests/test_generate.py holds the
ratio to >= 5 (a slow test) and checks that both give the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdtrain.generate.decode import generate_tokens  # noqa: E402
from sdtrain.generate.sampling import Sampler  # noqa: E402
from sdtrain.model.gpt import GPT, GPTConfig  # noqa: E402

CONFIG = GPTConfig(n_layers=4, d_model=256, n_heads=4, seq_len=512, vocab_size=256)
PROMPT = list(b"def main(argv):\n")


def measure(new_tokens: int = 256, repeats: int = 3) -> dict:
    model = GPT(CONFIG, seed=1).eval()
    best = {True: float("inf"), False: float("inf")}
    tokens = {}
    for _ in range(repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            tokens[use_cache] = list(generate_tokens(model, PROMPT, new_tokens, Sampler(temperature=0), use_cache))
            best[use_cache] = min(best[use_cache], time.perf_counter() - start)
    cached, recomputed = new_tokens / best[True], new_tokens / best[False]
    return {"new_tokens": new_tokens, "threads": torch.get_num_threads(), "tokens_per_s_cache": round(cached, 1),
            "tokens_per_s_no_cache": round(recomputed, 1), "ratio": round(cached / recomputed, 2),
            "same_tokens": tokens[True] == tokens[False]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.new_tokens, args.repeats)))
