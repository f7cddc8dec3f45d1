"""`sdtrain export`: consolidated model weights from a sharded DCP checkpoint.

Runs in one process with no process group: DCP re-assembles every shard into full
tensors, whatever world size or strategy wrote them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sdtrain.errors import CheckpointError, printable
from sdtrain.train.checkpoint_layout import checkpoint_dir, latest_checkpoint
from sdtrain.train.checkpoint_verify import verify_checkpoint
from sdtrain.train.safe_reader import SafeFileSystemReader, SafeLoadPlanner

TIED = {"lm_head.weight": "tok_emb.weight"}  # saved once; a loader re-ties them


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoints/step_<N> folder, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{printable(path)} does not exist; give a checkpoints/step_<N> folder or a run directory")
    if checkpoint_dir(path).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run directory {printable(path)} has no complete checkpoint (checkpoints/latest)")
        return latest
    return path


def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Full model tensors keyed by parameter name, and the checkpoint's sdtrain.json."""
    path = resolve_checkpoint(path)
    info = verify_checkpoint(path)  # whole, and its metadata safe, before anything is loaded
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()
    weights = {key: md for key, md in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not weights:
        raise CheckpointError(f"checkpoint {printable(path)} holds no model weights")
    check_fits_in_memory(path, sum(md.size.numel() * md.properties.dtype.itemsize for md in weights.values()))
    state = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in weights.items()}
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return {key.removeprefix("model."): tensor for key, tensor in state.items()}, info


def check_fits_in_memory(path: Path, nbytes: int) -> None:
    """Export holds every weight in memory at once: a model larger than this machine's free
    memory is refused before anything is allocated (verification bounds the tensors by the
    model its sdtrain.json names, but that model may itself be beyond this machine)."""
    import psutil

    free = psutil.virtual_memory().available
    if nbytes > free:
        raise CheckpointError(f"checkpoint {printable(path)} holds {nbytes / 2**30:,.1f} GiB of model weights and this machine has "
                              f"{free / 2**30:,.1f} GiB of memory free: export needs them all in memory at once")


def export_safetensors(checkpoint: str | Path, out: str | Path, force: bool = False) -> int:
    out = check_output(out, force)  # before the checkpoint is read: a bad OUT costs nothing
    weights, info = load_model_weights(checkpoint)
    for tied, source in TIED.items():
        if tied in weights and source in weights and torch.equal(weights[tied], weights[source]):
            del weights[tied]
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "sdtrain_model": json.dumps(info["model"]), "step": str(info["step"]),
                "tied": json.dumps(TIED)}
    # Into a temporary file renamed over OUT at the end: a crash or a full disk leaves
    # OUT as it was, never half a file.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(weights)


def check_output(out: str | Path, force: bool) -> Path:
    """OUT as export will write it; CheckpointError if it cannot or must not be written."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{printable(out)}: the output file name must end in .safetensors")
    if out.is_dir():
        raise CheckpointError(f"{printable(out)} is a directory; give a file name ending in .safetensors")
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"{printable(out)} already exists; pass --force to overwrite it, or choose another name")
    parent = out.absolute().parent
    while not parent.exists():  # export creates missing folders: the first existing one must take them
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {printable(out)}: {printable(parent)} is not a writable folder")
    return out
