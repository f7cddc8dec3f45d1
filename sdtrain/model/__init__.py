"""The built-in GPT. `sdtrain.model.size` is torch-free (the launcher sizes models with it),
so the torch-backed names load on first use."""

from sdtrain.model.size import count_params, flops_per_token

__all__ = ["GPT", "GPTConfig", "count_params", "flops_per_token"]


def __getattr__(name: str):
    if name in ("GPT", "GPTConfig"):
        from sdtrain.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'sdtrain.model' has no attribute {name!r}")
