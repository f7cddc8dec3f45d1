"""Model size arithmetic without torch: parameter count and training FLOPs per token.

Works on anything with the GPT's shape fields (GPTConfig, or a recipe's `model` section),
so the launcher and `sdtrain estimate` can size a model without building it. The llama
fields may be absent (a checkpoint's older sdtrain.json) or None (their defaults): the
helpers below resolve them, as GPTConfig does.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass


LLAMA_MULTIPLE_OF = 256  # LLaMA rounds its SwiGLU width up to a multiple of this
DEFAULT_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0


def arch_of(cfg) -> str:
    return getattr(cfg, "arch", None) or "gpt2"


def is_llama(cfg) -> bool:
    return arch_of(cfg) == "llama"


def kv_heads(cfg) -> int:
    """Key/value heads (grouped-query attention); None: one per query head."""
    return getattr(cfg, "n_kv_heads", None) or cfg.n_heads


def llama_ffn_hidden(d_model: int, multiple_of: int = LLAMA_MULTIPLE_OF) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4d (the three matrices then cost what GPT-2's two of 4d
    do), rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def mlp_width(cfg) -> int:
    """The dense MLP's hidden width: ffn_hidden (or LLaMA's rounding) for llama, mlp_ratio x d for gpt2."""
    if is_llama(cfg):
        return getattr(cfg, "ffn_hidden", None) or llama_ffn_hidden(cfg.d_model)
    return cfg.mlp_ratio * cfg.d_model


def ties_embeddings(cfg) -> bool:
    """Whether the output head is the token embedding; None: true for gpt2, false for llama."""
    tied = getattr(cfg, "tie_embeddings", None)
    return (not is_llama(cfg)) if tied is None else tied


def has_bias(cfg) -> bool:
    """Biases in linears and norms; None: true for gpt2, false for llama (which has none)."""
    bias = getattr(cfg, "bias", None)
    return (not is_llama(cfg)) if bias is None else bias


def count_params(cfg, active: bool = False) -> int:
    """Closed form of GPT.num_params(), for planning without building the model. `active`:
    the parameters one token uses (of an MoE MLP, the router and top_k experts)."""
    blocks = sum(block_params(cfg, i, active) for i in range(cfg.n_layers))
    return embedding_params(cfg) + blocks + final_norm_params(cfg) + head_params(cfg)


def moe_of(cfg) -> dict | None:
    """The MoE settings of a GPTConfig or a recipe's model section, as a dict (None: dense)."""
    moe = getattr(cfg, "moe", None)
    if is_dataclass(moe):  # a GPTConfig's MoESettings
        moe = asdict(moe)
    moe = moe if moe is None or isinstance(moe, dict) else moe.model_dump()
    return moe if moe and moe["num_experts"] else None


def moe_at(cfg, index: int) -> dict | None:
    """The MoE settings if block `index`'s MLP is a mixture of experts (blocks n-1, 2n-1, ...
    for every_n_layers n), else None."""
    moe = moe_of(cfg)
    return moe if moe is not None and (index + 1) % moe["every_n_layers"] == 0 else None


def expert_weights(cfg) -> int:
    """One expert's weights, no biases: fc and proj (gpt2); gate, up and proj (llama's SwiGLU)."""
    return (3 if is_llama(cfg) else 2) * cfg.d_model * mlp_width(cfg)


def block_params(cfg, index: int = 0, active: bool = False) -> int:
    """Block `index`'s parameters (an MoE block: router and experts, which have no biases)."""
    d, hidden, b = cfg.d_model, mlp_width(cfg), 1 if has_bias(cfg) else 0
    kv = 2 * kv_heads(cfg) * (d // cfg.n_heads)  # k and v widths
    attn = d * (d + kv) + b * (d + kv) + d * d + b * d
    mlp = (3 if is_llama(cfg) else 2) * d * hidden + b * hidden + b * d
    moe = moe_at(cfg, index)
    if moe is not None:
        experts = moe["top_k"] if active else moe["num_experts"]
        mlp = d * moe["num_experts"] + experts * expert_weights(cfg)
    norms = 2 * (d + b * d)
    return attn + mlp + norms


def expert_params(cfg, index: int) -> int:
    """Block `index`'s expert weights (0 for a dense block): what expert parallelism splits."""
    moe = moe_at(cfg, index)
    return moe["num_experts"] * expert_weights(cfg) if moe is not None else 0


def embedding_params(cfg) -> int:
    """Token and position embeddings (the token one is also the output head where tied;
    llama has no position embedding: rotary positions have no weights)."""
    return cfg.vocab_size * cfg.d_model + position_params(cfg)


def position_params(cfg) -> int:
    return 0 if is_llama(cfg) else cfg.seq_len * cfg.d_model


def head_params(cfg, first: bool = True, last: bool = True) -> int:
    """The output head's own parameters on a part holding the embedding (`first`) and the
    head (`last`): untied, a matrix of its own; tied, none on one stage, but a last stage
    without the embedding holds a copy of it."""
    if not last or (first and ties_embeddings(cfg)):
        return 0
    return cfg.vocab_size * cfg.d_model


def final_norm_params(cfg) -> int:
    return cfg.d_model * (2 if has_bias(cfg) else 1)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus 12·L·d·T for
    attention scores (PaLM appendix B). N leaves out the position embedding, a lookup; the
    tied head is a real matmul and stays in (an untied head is, and the token embedding is
    then only a lookup). Of an MoE model only the active parameters count (what a token
    computes with), as MFU should."""
    lookups = position_params(cfg) + head_params(cfg)  # an untied head's size is the embedding's
    n = count_params(cfg, active=True) - lookups
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
