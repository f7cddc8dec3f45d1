"""Model size arithmetic without torch: parameter count and training FLOPs per token.

Works on anything with the GPT's shape fields (GPTConfig, or a recipe's `model` section),
so the launcher and `sdtrain estimate` can size a model without building it.
"""

from __future__ import annotations


def count_params(cfg) -> int:
    """Closed form of GPT.num_params(), for planning without building the model."""
    d, L, hidden = cfg.d_model, cfg.n_layers, cfg.mlp_ratio * cfg.d_model
    b = 1 if cfg.bias else 0
    attn = d * 3 * d + b * 3 * d + d * d + b * d
    mlp = d * hidden + b * hidden + hidden * d + b * d
    norms = 2 * (d + b * d)
    block = attn + mlp + norms
    return cfg.vocab_size * d + cfg.seq_len * d + L * block + (d + b * d)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus 12·L·d·T for
    attention scores (PaLM appendix B). N leaves out the position embedding, a lookup; the
    tied head is a real matmul and stays in."""
    n = count_params(cfg) - cfg.seq_len * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
