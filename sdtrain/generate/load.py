"""The model and the vocabulary `sdtrain generate` decodes with, from a run's checkpoint
(read and verified by export's one-process reader: any world size or strategy that wrote it)
or from a Hugging Face folder.

The vocabulary is the one the model was trained with: the tokenizer.json the run's recipe
named (`data.tokenizer` of the recipe.yaml in the run directory), else bytes; `--tokenizer`
overrides it. A Hugging Face folder brings its own tokenizer.json.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtrain.errors import CheckpointError, UserInputError, printable
from sdtrain.generate.vocab import BYTE_VOCAB, ByteVocab, TokenizerVocab

RECIPE = "recipe.yaml"  # a run directory's resolved recipe, beside checkpoints/
MAX_RECIPE_BYTES = 1 << 20
# A byte-level model's vocabulary may be padded past 256 (to a multiple a kernel or tensor
# parallelism likes); one past this is a tokenizer's, and decoding it as bytes would be nonsense.
MAX_BYTE_MODEL_VOCAB = 512


@dataclass
class Loaded:
    model: torch.nn.Module
    vocab: ByteVocab | TokenizerVocab
    description: str  # what was loaded, for the one line on stderr


def load_for_generation(path: str, tokenizer: str | None = None, device: str | None = None) -> Loaded:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    origin, said = "--tokenizer", tokenizer is not None  # said: whether anything tells bytes from a tokenizer
    if Path(path, "config.json").is_file() and not Path(path, "checkpoints").exists():
        model, description = _from_hf_folder(path), f"{printable(path)} (Hugging Face)"
        if tokenizer is None and Path(path, "tokenizer.json").is_file():
            tokenizer, origin, said = str(Path(path, "tokenizer.json")), "the Hugging Face folder", True
    else:
        model, step_dir, description = _from_checkpoint(path)
        if tokenizer is None:
            said, tokenizer = _recipe_tokenizer(step_dir)
            origin = "the run's recipe (data.tokenizer)"
    vocab = _vocab(tokenizer, model.cfg.vocab_size, origin, said)
    return Loaded(model.to(device).eval(), vocab, f"{description}, vocabulary {vocab.description}, on {device}")


def _from_checkpoint(path: str):
    from sdtrain.model.gpt import GPT, GPTConfig
    from sdtrain.train.export import load_model_weights, resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    weights, info = load_model_weights(step_dir)  # verified: whole, safe, shapes of the model it names
    model = GPT(GPTConfig(**info["model"]))
    tied = model.lm_head.weight is model.tok_emb.weight
    if tied:  # the head is the embedding: a checkpoint may hold it once
        weights.setdefault("lm_head.weight", weights.get("tok_emb.weight"))
    missing = sorted(name for name in model.state_dict() if weights.get(name) is None)
    if missing:
        raise CheckpointError(f"checkpoint {printable(step_dir)} lacks {len(missing)} model tensor(s) "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                              "it is not a whole model: give another checkpoint")
    model.load_state_dict(weights, strict=False)  # only names the model has (verification checked the rest)
    return model, step_dir, f"{printable(step_dir)} (step {info['step']})"


def _from_hf_folder(folder: str):
    from sdtrain.model.hf_import import load_hf_model  # config.json checked, safetensors only

    return load_hf_model(folder)


def _recipe_tokenizer(step_dir: Path) -> tuple[bool, str | None]:
    """Whether the run's recipe.yaml (checkpoints/step_N/../../recipe.yaml) is there, and its
    data.tokenizer (None: bytes)."""
    from sdtrain.user_files import parse_yaml, read_text

    recipe = step_dir.parent.parent / RECIPE
    if step_dir.parent.name != "checkpoints" or not recipe.is_file():
        return False, None
    data = parse_yaml(read_text(recipe, "run recipe", MAX_RECIPE_BYTES, "YAML"), printable(recipe))
    section = data.get("data") if isinstance(data, dict) else None
    name = section.get("tokenizer") if isinstance(section, dict) else None
    return True, name if isinstance(name, str) else None


def _vocab(tokenizer: str | None, model_vocab: int, origin: str, said: bool):
    if tokenizer is None:
        if not said and model_vocab > MAX_BYTE_MODEL_VOCAB:
            raise UserInputError(f"nothing names the model's tokenizer (no recipe.yaml beside the checkpoint, no "
                                 f"tokenizer.json in the folder) and its {model_vocab:,} token ids are too many for "
                                 "bytes: give it with --tokenizer tokenizer.json")
        if model_vocab < BYTE_VOCAB:
            raise UserInputError(f"the model has {model_vocab} token ids, fewer than the 256 bytes; it was trained with "
                                 "a tokenizer: give it with --tokenizer tokenizer.json")
        return ByteVocab()
    from sdtrain.train.sources import _load_tokenizer  # the training data's reader: same checks, same messages

    if not os.path.lexists(tokenizer):
        raise UserInputError(f"tokenizer {printable(tokenizer)} (from {origin}) does not exist here; "
                             "give the tokenizer.json the model was trained with: --tokenizer PATH")
    vocab = TokenizerVocab(_load_tokenizer(tokenizer), printable(tokenizer))
    if vocab.size > model_vocab:
        raise UserInputError(f"tokenizer {printable(tokenizer)} has {vocab.size:,} tokens and the model only "
                             f"{model_vocab:,} ids: not the tokenizer it was trained with")
    return vocab
