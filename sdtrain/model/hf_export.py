"""`sdtrain export CHECKPOINT OUT_DIR --format hf`: a folder transformers loads as it is
(AutoModelForCausalLM: GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM).

config.json, model.safetensors (or shards of at most --max-shard-size and
model.safetensors.index.json, as save_pretrained writes them), generation_config.json, and the
recipe's tokenizer.json where the run used one. Tensors take the HF names and layouts of
hf_names.py; a bias-free gpt2 model gets zero biases (HF's GPT-2 always has them, and zero is
what sdtrain's layers add). The folder is written beside OUT_DIR and renamed into place at the
end: a crash leaves OUT_DIR as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtrain.errors import CheckpointError, printable
from sdtrain.model.hf_config import export_problems, hf_config, hf_model_type, resolved
from sdtrain.model.hf_files import INDEX, WEIGHTS
from sdtrain.model.hf_names import hf_tensor

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
NO_BIAS = ("tok_emb.weight", "pos_emb.weight", "lm_head.weight")


def hf_tensors(weights: dict[str, torch.Tensor], model: dict) -> dict[str, torch.Tensor]:
    """sdtrain's whole weights (export.load_model_weights) under their HF names and layouts."""
    model_type, tied = hf_model_type(model), bool(resolved(model, "tie_embeddings"))
    out = {}
    for name, value in weights.items():
        if tied and name == "lm_head.weight":
            continue  # transformers ties it to the embedding it saves
        where = hf_tensor(model_type, name, tied)
        parts = [(where.name.format(j=j), v) for j, v in enumerate(value.unbind(0))] if where.per_expert \
            else [(where.name, value)]
        for hf_name, part in parts:
            out[hf_name] = (part.t() if where.transpose else part).contiguous()
        if model_type == "gpt2" and not resolved(model, "bias") and name.endswith(".weight") and name not in NO_BIAS:
            out[hf_tensor(model_type, name.removesuffix("weight") + "bias").name] = torch.zeros(value.shape[0], dtype=value.dtype)
    return out


def shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, a new shard where the next would pass max_bytes (a tensor larger than
    that is a shard of its own, as save_pretrained does)."""
    out: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if out[-1] and size + nbytes > max_bytes:
            out.append({})
            size = 0
        out[-1][name] = tensor
        size += nbytes
    return out


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    parts = shards(tensors, max_bytes)
    if len(parts) == 1:
        save_file(parts[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for name, part in zip(names, parts):
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return names + [INDEX]


def export_hf(checkpoint: str | Path, out_dir: str | Path, force: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write the folder; the names of the files written."""
    from sdtrain.train.export import load_model_weights, resolve_checkpoint

    out_dir = check_out_dir(out_dir, force)
    if max_shard_bytes < 1:
        raise CheckpointError(f"--max-shard-size {max_shard_bytes}: give a positive size, e.g. 5GB or 500MB")
    path = resolve_checkpoint(checkpoint)
    weights, info = load_model_weights(path)
    model = info["model"]
    problems = export_problems(model)
    if problems:
        raise CheckpointError(f"{printable(path)} cannot be exported for transformers: " + "; ".join(problems))
    tensors = hf_tensors(weights, model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        written = write_weights(staging, tensors, max_shard_bytes)
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        (staging / "config.json").write_text(json.dumps(hf_config(model, dtype), indent=2))
        (staging / "generation_config.json").write_text(json.dumps(
            {"_from_model_config": True, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}, indent=2))
        written += ["config.json", "generation_config.json"]
        tokenizer = run_tokenizer(path)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / "tokenizer.json")
            written.append("tokenizer.json")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # --force, checked above
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def run_tokenizer(checkpoint: Path) -> Path | None:
    """The tokenizer.json the run's recipe named (runs/<name>/recipe.yaml beside checkpoints/)."""
    import yaml

    recipe = checkpoint.parent.parent / "recipe.yaml"
    if not recipe.is_file():
        return None
    data = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    tokenizer = data.get("tokenizer") if isinstance(data, dict) else None
    if not tokenizer:
        return None
    if not Path(tokenizer).is_file():
        raise CheckpointError(f"the run's recipe ({printable(recipe)}) names tokenizer {printable(tokenizer)}, which "
                              f"is not a file from here; run export where the recipe's paths resolve")
    return Path(tokenizer)


def check_out_dir(out_dir: str | Path, force: bool) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{printable(out_dir)} is a file; --format hf writes a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise CheckpointError(f"{printable(out_dir)} already exists and is not empty; pass --force to replace it, "
                                  f"or choose another folder")
        if not (out_dir / "config.json").is_file():  # --force replaces a model folder, never any folder
            raise CheckpointError(f"{printable(out_dir)} is not empty and holds no config.json: --force replaces a "
                                  f"model folder only; choose another folder")
    return out_dir
