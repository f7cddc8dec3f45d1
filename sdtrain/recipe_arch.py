"""The model's architecture in the recipe (`model.arch`: gpt2 | llama): which keys each one
takes, and the defaults that depend on it.

A default that depends on the architecture (bias, tie_embeddings, and llama's n_kv_heads,
rope_theta, ffn_hidden) is written as null in the schema and resolved here, once, so the
run directory's recipe.yaml says what ran. A key the architecture has no use for is refused,
naming it, rather than silently ignored.
"""

from __future__ import annotations

from sdtrain.divisors import divisors
from sdtrain.model.size import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, has_bias, kv_heads, mlp_width, ties_embeddings


def arch_problem(model) -> str | None:
    """What in a recipe's model section its architecture cannot build, as one line naming the
    key (relative to `model`, as the section's other errors do) and the fix; None if nothing."""
    heads, kv = model.n_heads, model.n_kv_heads
    if kv is not None and heads % kv:
        return (f"n_kv_heads {kv} does not divide n_heads {heads} (each key/value head serves a whole group of "
                f"query heads); pick n_kv_heads from {divisors(heads)}")
    if model.arch == "gpt2":
        if kv is not None and kv != heads:
            return (f"n_kv_heads {kv} with arch gpt2: GPT-2's attention has one key/value head per query head; "
                    "remove n_kv_heads, or set arch llama for grouped-query attention")
        for key, instead in (("rope_theta", "GPT-2 learns its positions"), ("rope_scaling", "GPT-2 learns its positions"),
                             ("ffn_hidden", "use mlp_ratio")):
            if getattr(model, key) is not None:
                return f"{key} is a llama setting and arch is gpt2 ({instead}); remove it, or set arch llama"
        if model.activation != "gelu" and model.moe.num_experts:
            return (f"activation {model.activation} with moe: the experts' GELU is the exact one; "
                    "remove activation, or moe.num_experts 0")
        return None
    if model.activation != "gelu":
        return f"activation {model.activation} is a gpt2 setting (llama's MLP is SwiGLU); remove it, or set arch gpt2"
    if model.bias:
        return "bias true with arch llama: LLaMA's blocks have no biases; remove bias (or set it false)"
    head_dim = model.d_model // heads
    if head_dim % 2:
        return (f"arch llama needs an even head size for rotary embedding, and d_model {model.d_model} / n_heads "
                f"{heads} is {head_dim}; pick n_heads so that d_model / n_heads is even")
    return None


def arch_defaults(model) -> dict:
    """The values the null keys of a model section resolve to (size.py's rules, which GPTConfig
    and every torch-free count follow too)."""
    values = {"bias": has_bias(model), "tie_embeddings": ties_embeddings(model),
              "norm_eps": model.norm_eps or DEFAULT_NORM_EPS}
    if model.arch == "llama":
        values.update(n_kv_heads=kv_heads(model), rope_theta=model.rope_theta or DEFAULT_ROPE_THETA,
                      ffn_hidden=mlp_width(model))
    return values



LATER_KEYS = ("arch", "n_kv_heads", "rope_theta", "rope_scaling", "ffn_hidden", "tie_embeddings", "norm_eps")


def resolved_saved_model(model: dict) -> dict:
    """A model section as a checkpoint's sdtrain.json holds it, with the keys that came after
    it was written (a checkpoint older than model.arch) at what they resolve to: such a model
    is the GPT-2 it was, and compares equal to the same recipe today."""
    from types import SimpleNamespace

    filled = {key: None for key in LATER_KEYS} | {"arch": "gpt2", "activation": "gelu"} | model
    try:
        return filled | arch_defaults(SimpleNamespace(**filled))
    except (TypeError, AttributeError, ZeroDivisionError):  # input like the rest: the comparison names it
        return filled
