"""Model size arithmetic without torch: parameter count and training FLOPs per token.

Works on anything with the GPT's shape fields (GPTConfig, or a recipe's `model` section),
so the launcher and `sdtrain estimate` can size a model without building it.
"""

from __future__ import annotations


def count_params(cfg) -> int:
    """Closed form of GPT.num_params(), for planning without building the model."""
    return embedding_params(cfg) + cfg.n_layers * block_params(cfg) + final_norm_params(cfg)


def block_params(cfg) -> int:
    d, hidden, b = cfg.d_model, cfg.mlp_ratio * cfg.d_model, 1 if cfg.bias else 0
    attn = d * 3 * d + b * 3 * d + d * d + b * d
    mlp = d * hidden + b * hidden + hidden * d + b * d
    norms = 2 * (d + b * d)
    return attn + mlp + norms


def embedding_params(cfg) -> int:
    """Token and position embeddings (the token one is also the tied output head)."""
    return cfg.vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model


def final_norm_params(cfg) -> int:
    return cfg.d_model * (2 if cfg.bias else 1)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus 12·L·d·T for
    attention scores (PaLM appendix B). N leaves out the position embedding, a lookup; the
    tied head is a real matmul and stays in."""
    n = count_params(cfg) - cfg.seq_len * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
