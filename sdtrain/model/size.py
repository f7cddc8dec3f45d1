"""Model size arithmetic without torch: parameter count and training FLOPs per token.

Works on anything with the GPT's shape fields (GPTConfig, or a recipe's `model` section),
so the launcher and `sdtrain estimate` can size a model without building it.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass


def count_params(cfg, active: bool = False) -> int:
    """Closed form of GPT.num_params(), for planning without building the model. `active`:
    the parameters one token uses (of an MoE MLP, the router and top_k experts)."""
    blocks = sum(block_params(cfg, i, active) for i in range(cfg.n_layers))
    return embedding_params(cfg) + blocks + final_norm_params(cfg)


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
    """One expert's weights: fc and proj, no biases."""
    return 2 * cfg.d_model * cfg.mlp_ratio * cfg.d_model


def block_params(cfg, index: int = 0, active: bool = False) -> int:
    """Block `index`'s parameters (an MoE block: router and experts, which have no biases)."""
    d, hidden, b = cfg.d_model, cfg.mlp_ratio * cfg.d_model, 1 if cfg.bias else 0
    attn = d * 3 * d + b * 3 * d + d * d + b * d
    mlp = d * hidden + b * hidden + hidden * d + b * d
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
    """Token and position embeddings (the token one is also the tied output head)."""
    return cfg.vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model


def final_norm_params(cfg) -> int:
    return cfg.d_model * (2 if cfg.bias else 1)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6N for the matmuls of forward + backward, plus 12·L·d·T for
    attention scores (PaLM appendix B). N leaves out the position embedding, a lookup; the
    tied head is a real matmul and stays in. Of an MoE model only the active parameters count
    (what a token computes with), as MFU should."""
    n = count_params(cfg, active=True) - cfg.seq_len * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len
