from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.model.size import count_params, flops_per_token

__all__ = ["GPT", "GPTConfig", "count_params", "flops_per_token"]
