"""What a model must allow to be split over T tensor-parallel ranks, checked before anything
starts (torch-free, so the recipe and the launcher can ask): one clear line per problem,
naming the recipe key and the fix."""

from __future__ import annotations

from sdtrain.divisors import divisors
from sdtrain.errors import RecipeError

# Suggested sizes stop here: tensor parallelism stays inside a node (its collectives run in
# every layer), and a list of every divisor of 50304 helps nobody.
LARGEST_SUGGESTED = 64


def check_tensor_parallel(tp: int, n_heads: int, mlp_width: int, vocab_size: int, seq_len: int,
                          sequence_parallel: bool, n_kv_heads: int | None = None,
                          width_source: str = "model.mlp_ratio x model.d_model") -> None:
    """MoE layers need nothing of T: they stay whole on every tp rank (tp_moe.py).
    `n_kv_heads`: llama's key/value heads (None: one per query head, as gpt2's);
    `width_source`: the recipe keys the MLP width comes from (llama's: model.ffn_hidden)."""
    if tp == 1:
        return
    key = "parallel.tensor_parallel"
    if n_heads % tp:
        raise RecipeError(f"model.n_heads {n_heads} is not divisible by {key} {tp}: each rank computes n_heads / {tp} "
                          f"heads; use {key} in {_sizes(n_heads)}, or n_heads a multiple of {tp}")
    if n_kv_heads is not None and n_kv_heads % tp:
        # k and v are cut by whole key/value heads: a rank's query heads must find their
        # group's key/value head on the same rank.
        raise RecipeError(f"model.n_kv_heads {n_kv_heads} is not divisible by {key} {tp}: each rank computes "
                          f"n_kv_heads / {tp} key/value heads (and their groups of query heads); use {key} in "
                          f"{_sizes(n_kv_heads)}, or n_kv_heads a multiple of {tp}")
    if mlp_width % tp:  # with GPT-2's width (mlp_ratio x d_model) the heads' check covers it; not with every arch's
        raise RecipeError(f"the MLP width {mlp_width} ({width_source}) is not divisible by {key} "
                          f"{tp}: each rank holds width / {tp} of its features; use {key} in {_sizes(mlp_width)}, or "
                          f"a width that is a multiple of {tp}")
    if vocab_size % tp:
        padded = -(-vocab_size // tp) * tp
        raise RecipeError(f"model.vocab_size {vocab_size} is not divisible by {key} {tp}: each rank holds "
                          f"vocab_size / {tp} rows of the embedding and head; pad it: model.vocab_size={padded} "
                          f"(ids past the tokenizer's are never seen), or use {key} in {_sizes(vocab_size)}")
    if sequence_parallel and seq_len % tp:
        raise RecipeError(f"model.seq_len {seq_len} is not divisible by {key} {tp}: parallel.sequence_parallel splits "
                          f"every sequence over the ranks; use seq_len a multiple of {tp}, or "
                          f"parallel.sequence_parallel=false")


def _sizes(n: int) -> list[int]:
    return [d for d in divisors(n) if d <= LARGEST_SUGGESTED]
