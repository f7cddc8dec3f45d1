"""Where each sdtrain parameter lives in a Hugging Face transformers checkpoint (GPT-2,
LLaMA, Mixtral), and in which layout. Torch-free: one table per architecture, from sdtrain's names, used both
ways: import reads the HF tensors a parameter names, export writes them.

- GPT-2's Conv1D stores its weights as [in, out], the transpose of nn.Linear's: `transpose`.
  Its c_attn is our fused qkv (q, k, v stacked along the outputs in the same order).
- Mixtral keeps each expert as three Linear layers (w1 gate, w3 up: [F, d]; w2 down: [d, F]);
  sdtrain stacks the experts of a layer into [E, d, F] / [E, F, d] tensors: expert j of our
  `experts.w1` is HF's `experts.{j}.w1.weight` transposed (`per_expert`).
- A tied head has no tensor of its own in the file (transformers saves it once, as the
  embedding): `lm_head.weight` of a tied model reads the embedding's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class HFTensor:
    name: str  # the tensor's name in the HF file; with `per_expert`, a pattern with `{j}`
    transpose: bool = False  # stored as the transpose of sdtrain's parameter (of each expert's slice)
    per_expert: bool = False  # one HF tensor per expert j, stacked along sdtrain's first dimension


_BLOCK = r"blocks\.(\d+)\."

GPT2 = [
    (r"tok_emb\.weight", "transformer.wte.weight", False),
    (r"pos_emb\.weight", "transformer.wpe.weight", False),
    (_BLOCK + r"ln_attn\.(weight|bias)", r"transformer.h.\1.ln_1.\2", False),
    (_BLOCK + r"attn\.qkv\.weight", r"transformer.h.\1.attn.c_attn.weight", True),
    (_BLOCK + r"attn\.qkv\.bias", r"transformer.h.\1.attn.c_attn.bias", False),
    (_BLOCK + r"attn\.proj\.weight", r"transformer.h.\1.attn.c_proj.weight", True),
    (_BLOCK + r"attn\.proj\.bias", r"transformer.h.\1.attn.c_proj.bias", False),
    (_BLOCK + r"ln_mlp\.(weight|bias)", r"transformer.h.\1.ln_2.\2", False),
    (_BLOCK + r"mlp\.fc\.weight", r"transformer.h.\1.mlp.c_fc.weight", True),
    (_BLOCK + r"mlp\.fc\.bias", r"transformer.h.\1.mlp.c_fc.bias", False),
    (_BLOCK + r"mlp\.proj\.weight", r"transformer.h.\1.mlp.c_proj.weight", True),
    (_BLOCK + r"mlp\.proj\.bias", r"transformer.h.\1.mlp.c_proj.bias", False),
    (r"ln_f\.(weight|bias)", r"transformer.ln_f.\1", False),
    (r"lm_head\.weight", "lm_head.weight", False),
]

LLAMA = [
    (r"tok_emb\.weight", "model.embed_tokens.weight", False),
    (_BLOCK + r"ln_attn\.weight", r"model.layers.\1.input_layernorm.weight", False),
    (_BLOCK + r"attn\.(q|k|v)\.weight", r"model.layers.\1.self_attn.\2_proj.weight", False),
    (_BLOCK + r"attn\.proj\.weight", r"model.layers.\1.self_attn.o_proj.weight", False),
    (_BLOCK + r"ln_mlp\.weight", r"model.layers.\1.post_attention_layernorm.weight", False),
    (_BLOCK + r"mlp\.(gate|up)\.weight", r"model.layers.\1.mlp.\2_proj.weight", False),
    (_BLOCK + r"mlp\.proj\.weight", r"model.layers.\1.mlp.down_proj.weight", False),
    (r"ln_f\.weight", "model.norm.weight", False),
    (r"lm_head\.weight", "lm_head.weight", False),
]

# Mixtral: LLaMA's blocks with a sparse MoE MLP in every one (block_sparse_moe).
MIXTRAL_MOE = [
    (_BLOCK + r"mlp\.router\.weight", r"model.layers.\1.block_sparse_moe.gate.weight", False),
    (_BLOCK + r"mlp\.experts\.(w1|w2|w3)", r"model.layers.\1.block_sparse_moe.experts.{j}.\2.weight", True),
]

TABLES = {"gpt2": GPT2, "llama": LLAMA, "mixtral": MIXTRAL_MOE + LLAMA}
EMBEDDING = "tok_emb.weight"


def hf_tensor(model_type: str, name: str, tied: bool = False) -> HFTensor:
    """The HF tensor holding sdtrain parameter `name` of a `model_type` model (gpt2, llama,
    mixtral); KeyError for a parameter the format has no place for."""
    if tied and name == "lm_head.weight":
        name = EMBEDDING
    for pattern, target, transpose in TABLES[model_type]:
        match = re.fullmatch(pattern, name)
        if match:
            hf_name = match.expand(target)
            return HFTensor(hf_name, transpose, per_expert="{j}" in hf_name)
    raise KeyError(f"{name} has no place in a {model_type} checkpoint")

