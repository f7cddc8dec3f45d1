"""Checkpoint reads stay inside the checkpoint and inside its model's size (issue 19).

The reproductions: a shard replaced by a link to a file elsewhere (same bytes, so its
manifest still matches), and metadata claiming a 2^40-element tensor backed by a sparse
file (a 4 TiB hole that takes no disk: the file is "long enough"). Both used to verify
(rc 0); the second then crashed export and resume allocating it."""

import json
import os
import pickle
import shutil

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex

from conftest import sdtrain
from sdtrain.train.checkpoint_manifest import MANIFEST, manifest_problems
from sdtrain.train.checkpoint_verify import checkpoint_problems, newest_whole_checkpoint
from sdtrain.train.safe_reader import read_metadata_file

HUGE = 1 << 40
EMBEDDING = "model.tok_emb.weight"


def words(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def copy_step(full_run, dest, step=10):
    _, run_dir = full_run
    shutil.copytree(run_dir / "checkpoints" / f"step_{step}", dest)
    return dest


def claim(ckpt, elements: int | None = None, extra_bytes: int = 0, shape: tuple | None = None):
    """Rewrite the embedding's metadata: `elements` elements (as [elements / 2^20, 2^20]) or `shape`,
    stored at the end of its shard with `extra_bytes` more than they take, the shard made
    long enough by a hole. The manifest goes: whoever crafts a checkpoint rewrites or drops it."""
    metadata = read_metadata_file(ckpt / ".metadata")
    entry = metadata.state_dict_metadata[EMBEDDING]
    [chunk] = entry.chunks
    where = metadata.storage_data.pop(MetadataIndex(EMBEDDING, chunk.offsets))
    if elements is not None:
        entry.size = chunk.sizes = torch.Size([elements >> 20, 1 << 20])
    if shape is not None:
        entry.size = chunk.sizes = torch.Size(shape)
    shard = ckpt / where.relative_path
    offset = shard.stat().st_size
    length = entry.size.numel() * entry.properties.dtype.itemsize + 2048 + extra_bytes
    metadata.storage_data[MetadataIndex(EMBEDDING, chunk.offsets)] = _StorageInfo(where.relative_path, offset, length)
    os.truncate(shard, offset + length)  # sparse: no disk behind it
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)  # as DCP writes it
    (ckpt / MANIFEST).unlink()
    return shard


def test_a_shard_linked_out_of_its_folder_is_refused_unread(full_run, tmp_path):
    run_dir = tmp_path / "run"
    ckpt = copy_step(full_run, run_dir / "checkpoints" / "step_10")
    copy_step(full_run, run_dir / "checkpoints" / "step_5", step=5)
    shard, outside = ckpt / "__1_0.distcp", tmp_path / "elsewhere.distcp"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert manifest_problems(ckpt) == []  # the same bytes: all a restart used to look at
    assert checkpoint_problems(ckpt) == [
        f"{shard} is a link to {str(outside)!r}, outside the checkpoint folder (a checkpoint's files are its own; copy them in)"]
    refused = {}
    newest, skipped = newest_whole_checkpoint(run_dir, refused=refused)
    assert newest == run_dir / "checkpoints" / "step_5" and skipped == [f"skipped checkpoint step_10: {shard} is a link" +
                                                                         skipped[0].split(" is a link", 1)[1]]
    # refused once, never looked at again in the job, even if it were mended
    shard.unlink()
    shutil.copy(outside, shard)
    assert checkpoint_problems(ckpt) == []
    newest, skipped = newest_whole_checkpoint(run_dir, refused=refused)
    assert newest == run_dir / "checkpoints" / "step_5" and "refused earlier in this job" in skipped[0]

    inside = ckpt / "alias.distcp"  # a link to a file of its own folder is that file
    inside.symlink_to(shard.name)
    assert checkpoint_problems(ckpt) == []


@pytest.mark.parametrize("case", ["2^40 elements", "bytes beyond the tensor", "a weight of another shape",
                                  "a model too big to size", "a 1 TiB .metadata", "a 1 TiB extra file"])
def test_sizes_beyond_the_model_are_refused_before_allocating(full_run, tmp_path, case):
    ckpt = copy_step(full_run, tmp_path / "ckpt")
    if case == "2^40 elements":
        claim(ckpt, elements=HUGE)
        expected = f"{ckpt / '.metadata'} records 1,099,511,"
    elif case == "bytes beyond the tensor":
        claim(ckpt, extra_bytes=HUGE)
        expected = f"{ckpt / '.metadata'} records 1,099,511,"
    elif case == "a weight of another shape":  # twice the rows: within the model's total, not its shape
        claim(ckpt, shape=(512, 32))
        expected = (f"{ckpt / '.metadata'} records 'model.tok_emb.weight' as (512, 32); the model of "
                    f"{ckpt / 'sdtrain.json'} has it as (256, 32)")
    elif case == "a 1 TiB .metadata":  # a byte string inside could say it is that long
        os.truncate(ckpt / ".metadata", HUGE)
        (ckpt / MANIFEST).unlink()
        expected = f"{ckpt / '.metadata'} is more than the 1,073,741,824 bytes checkpoint metadata takes"
    elif case == "a 1 TiB extra file":  # torch.load allocates what its records say
        os.truncate(ckpt / "rank1.extra.pt", HUGE)
        (ckpt / MANIFEST).unlink()
        expected = f"{ckpt / 'rank1.extra.pt'} is 1,099,511,627,776 bytes, not a rank's RNG and loss-scaler state"
    else:
        info = json.loads((ckpt / "sdtrain.json").read_text())
        info["model"]["n_layers"] = HUGE  # sizing it would loop 2^40 times
        (ckpt / "sdtrain.json").write_text(json.dumps(info))
        (ckpt / MANIFEST).unlink()
        expected = f"{ckpt / 'sdtrain.json'} records a model sdtrain cannot size"
    [problem] = checkpoint_problems(ckpt)
    assert problem.startswith(expected), problem
    if case == "2^40 elements":  # export and resume make this check before they load anything
        result = sdtrain("export", ckpt, tmp_path / "out.safetensors")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "more than a checkpoint of its model" in words(result.stderr)
        recipe, _ = full_run
        result = sdtrain("launch", recipe, "--run-dir", tmp_path / "new", "--set", f"train.resume={ckpt}",
                         "--set", "train.steps=20")
        assert result.returncode == 2 and "more than a checkpoint of its model" in words(result.stderr), result.stderr
        assert not (tmp_path / "new").exists()


def test_export_refuses_a_model_bigger_than_this_machine(full_run, tmp_path):
    """sdtrain.json itself claims a 2^40-element embedding (a vocabulary of 2^35 tokens), so the
    metadata is consistent with it: verification passes, and export, which holds every weight
    at once, says the model does not fit here instead of dying in the allocation."""
    ckpt = copy_step(full_run, tmp_path / "ckpt")
    claim(ckpt, shape=(HUGE >> 5, 32))
    info = json.loads((ckpt / "sdtrain.json").read_text())
    info["model"].update(vocab_size=HUGE >> 5)
    (ckpt / "sdtrain.json").write_text(json.dumps(info))
    assert checkpoint_problems(ckpt) == []
    result = sdtrain("export", ckpt, tmp_path / "out.safetensors")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "holds 4,096.0 GiB of model weights and this machine has" in words(result.stderr)
    assert not (tmp_path / "out.safetensors").exists()
