"""`model.init_from`: a model's first weights read from a Hugging Face folder (GPT-2, LLaMA,
Mixtral safetensors) instead of drawn from the seed.

Every strategy makes first values through `model.initial_value(name, out)` (the model whole,
a pipeline stage's part, ZeRO's flat units out of a meta-device model, tensor-parallel pieces
cut from the whole value, expert-parallel slices), so `load_pretrained` replaces that one
method on the model and fills the parameters already made. What each rank reads follows:
- a pipeline stage: only its own blocks (and embeddings / head if it has them);
- expert parallelism on a meta-device model: only its experts' tensors (one per expert);
  otherwise the whole layer's, kept in part by the strategy;
- ZeRO and tensor parallelism: the whole tensors of the parameters it makes, each then cut
  to the rank's shard or piece (a shard of a tensor is not a slice of the file's layout:
  GPT-2's weights are stored transposed, and a flat unit crosses parameters);
- GPT-2's position embedding: its first seq_len rows (safetensors' get_slice).
One tensor is held at a time. Before any read, every tensor the model needs is checked,
from the files' headers alone, to be there with the shape the recipe gives it.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from sdtrain.errors import printable
from sdtrain.model.hf_config import model_section, read_config, resolved
from sdtrain.model.hf_files import HFFolderError, TensorEntry, tensor_index
from sdtrain.model.hf_names import HFTensor, hf_tensor

# GPT-2's position embedding: its rows may outnumber the parameter's (seq_len <= n_positions)
POSITIONS = "pos_emb.weight"


class HFWeights:
    """The tensors of one HF folder, read on demand into sdtrain's parameters."""

    def __init__(self, folder: str | Path, tied: bool):
        self.folder = Path(folder)
        self.model_type = read_config(self.folder)["model_type"]
        self.tied = tied
        self.index: dict[str, TensorEntry] = tensor_index(self.folder)

    def _entry(self, name: str, shape: tuple[int, ...], more_rows: bool = False) -> TensorEntry:
        entry = self.index.get(name)
        if entry is None:
            fused = " (transformers' fused expert layout: save it with a transformers that writes experts.{j}.w1)" \
                if any(".experts.gate_up_proj" in key for key in self.index) else ""
            raise HFFolderError(f"{printable(self.folder)} has no tensor {name}{fused}; the model needs it")
        ok = entry.shape == shape or (more_rows and entry.shape[1:] == shape[1:] and entry.shape[0] >= shape[0])
        if not ok:
            raise HFFolderError(f"{printable(self.folder)}: tensor {name} has shape {list(entry.shape)}, the recipe's model "
                                f"needs {list(shape)}; the folder's config.json does not describe its weights")
        return entry

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise unless the tensors for parameter `name` of this `shape` are in the folder."""
        for hf_name, hf_shape in self._sources(name, shape):
            self._entry(hf_name, hf_shape, name == POSITIONS)

    def _sources(self, name: str, shape: tuple[int, ...], first_expert: int = 0):
        where = hf_tensor(self.model_type, name, self.tied)
        if where.per_expert:
            count, rest = shape[0], shape[1:]
            hf_shape = rest[::-1] if where.transpose else rest
            return [(where.name.format(j=first_expert + j), hf_shape) for j in range(count)]
        return [(where.name, shape[::-1] if where.transpose else shape)]

    def read(self, name: str, out: torch.Tensor, first_expert: int = 0) -> None:
        """Write parameter `name`'s value from the folder into `out` (on any device, any dtype)."""
        where: HFTensor = hf_tensor(self.model_type, name, self.tied)
        for j, (hf_name, hf_shape) in enumerate(self._sources(name, tuple(out.shape), first_expert)):
            entry = self._entry(hf_name, hf_shape, name == POSITIONS)
            with safe_open(str(entry.file), framework="pt") as f:
                part = f.get_slice(hf_name)
                value = part[: hf_shape[0]] if name == POSITIONS else part[:]
            value = value.t() if where.transpose else value
            (out[j] if where.per_expert else out).copy_(value)


def load_pretrained(model: nn.Module, folder: str | Path) -> HFWeights:
    """Make `model`'s first values the folder's weights, now for its real parameters and
    later for those a strategy makes (meta-device ones), through model.initial_value."""
    weights = HFWeights(folder, tied=bool(resolved(model.cfg, "tie_embeddings")))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, param in params.items():  # all there, all the right shape, before a byte is read
        weights.check(name, tuple(param.shape))

    def initial_value(name: str, out: torch.Tensor) -> None:
        module = name.rpartition(".")[0]
        weights.read(name, out, model.first_expert.get(module, 0))

    model.initial_value = initial_value
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied head is its embedding, read once
            if not param.is_meta:
                initial_value(name, param)
    return weights


def hf_model_config(folder: str | Path) -> dict:
    """GPTConfig's fields for the folder's model (sdtrain generate's way in)."""
    from sdtrain.model.gpt import GPTConfig

    section, _ = model_section(folder)
    known = {f.name for f in fields(GPTConfig)}
    moe = section.pop("moe", None)
    config = {k: v for k, v in section.items() if k in known}
    if moe is not None:
        config["moe"] = moe
    return config


def load_hf_model(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A whole sdtrain model with the folder's weights, on one process."""
    from sdtrain.model.gpt import GPT, GPTConfig

    with torch.device(device):  # name-seeded first, then overwritten: buffers (RoPE's) are made as usual
        model = GPT(GPTConfig(**hf_model_config(folder), init_from=str(folder)))
    load_pretrained(model, folder)
    return model.eval()
