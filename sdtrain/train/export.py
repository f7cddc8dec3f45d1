"""`sdtrain export`: consolidated model weights from a sharded DCP checkpoint.

Runs in one process with no process group: DCP re-assembles every shard into full
tensors, whatever world size or strategy wrote them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sdtrain.errors import CheckpointError
from sdtrain.train.checkpoint_layout import checkpoint_dir, latest_checkpoint
from sdtrain.train.checkpoint_verify import verify_checkpoint
from sdtrain.train.safe_reader import SafeFileSystemReader, SafeLoadPlanner

TIED = {"lm_head.weight": "tok_emb.weight"}  # saved once; a loader re-ties them


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoints/step_<N> folder, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a checkpoints/step_<N> folder or a run directory")
    if checkpoint_dir(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint (checkpoints/latest)")
        return latest
    return path


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full model tensors keyed by parameter name, and the checkpoint's sdtrain.json."""
    path = resolve_checkpoint(path)
    info = verify_checkpoint(path)  # whole, and its metadata safe, before anything is loaded
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}, info


def export_safetensors(checkpoint: str | Path, out: str | Path) -> int:
    weights, info = load_model_weights(checkpoint)
    for tied, source in TIED.items():
        if tied in weights and source in weights and torch.equal(weights[tied], weights[source]):
            del weights[tied]
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the output file name must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "sdtrain_model": json.dumps(info["model"]), "step": str(info["step"]),
                "tied": json.dumps(TIED)}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata=metadata)
    return len(weights)
