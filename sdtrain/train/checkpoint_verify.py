"""Is a checkpoint whole, and safe to load? One check, made before anything loads one:
by the launcher for a resume (before a worker starts) and before every restart
(launch/resume_target.py), and by `sdtrain export`.

A damaged checkpoint (a truncated shard, a broken `.metadata`, a missing file) would
otherwise pass the launcher and fail inside every worker; a crafted one must be refused
before any of it is unpickled, and before a loader allocates what its metadata describes:
every file is one of its folder (no link out of it), and the tensors it records are no
larger than the model of its sdtrain.json with its optimizer state (a sparse file can make
a 2^40-element tensor look whole). `checkpoint_problems` lists every problem (for a tool that
reports them all, or that falls back to an earlier checkpoint); `verify_checkpoint`
raises with the first.

Torch-free at import, for the launcher: torch is imported only when a checkpoint is
checked (its `.metadata` and extra files need it).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from sdtrain.errors import CheckpointError, printable
from sdtrain.train.checkpoint_layout import INFO, identity, read_info, step_checkpoints
from sdtrain.train.checkpoint_manifest import manifest_problems

METADATA = ".metadata"
FIX = "use an earlier checkpoint (checkpoints/step_<N>), or start afresh with --set train.resume=never"
MAX_WORLD_SIZE = 1 << 20  # sdtrain.json is input too: a world size bounds a loop below
MAX_LAYERS = 4096  # and its n_layers bounds sizing and building the model (about 1 ms a block)
# What a checkpoint may hold, in elements: the weights and Adam's two moments are 3 copies of
# the model; one more copy is room for state a strategy may add (fp32 masters beside low-precision
# weights); SMALL_STATE covers the step count and MoE balancer biases.
STATE_COPIES = 4
SMALL_STATE = 1 << 20
# torch.save's zip framing around a tensor's bytes (about 1.6 KB measured for every record of
# a checkpoint, ZeRO shards included: DCP saves each with a storage of its own size).
FRAMING_BYTES = 64 << 10
# rank<R>.extra.pt is an RNG state and a loss scaler's numbers (about 6.5 KB); torch.load
# allocates what its records say, so a sparse file is refused by its size before it is read.
MAX_EXTRA_BYTES = 16 << 20


def verify_checkpoint(path: str | Path, checksums: bool = True) -> dict:
    """The checkpoint's sdtrain.json if every file is whole; else CheckpointError naming
    the first bad file."""
    try:
        info = read_info(path)  # not a checkpoint at all: its own message says where to point
    except CheckpointError as exc:
        raise CheckpointError(printable(exc)) from None  # it echoes the path as given
    problems = checkpoint_problems(path, checksums)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(printable(f"checkpoint {path} cannot be used: {problems[0]}{more}; {FIX}"))  # paths echoed
    return info


def checkpoint_problems(path: str | Path, checksums: bool = True) -> list[str]:
    """Every problem of the checkpoint at `path`, each naming its file; [] if it is whole.
    `checksums` also compares sha256 with the manifest (~0.3 s per 100 MB on one core)."""
    path = Path(path)
    links = link_problems(path) if path.is_dir() else []
    if links:  # nothing is read through them, not even to hash it
        return links
    try:
        info = read_info(path)
    except CheckpointError as exc:
        return [str(exc)]
    problems = manifest_problems(path, checksums)
    if not (path / METADATA).is_file():
        return problems + [f"{path / METADATA} is missing"]
    from sdtrain.train.safe_reader import read_metadata_file

    try:
        metadata = read_metadata_file(path / METADATA)
    except CheckpointError as exc:
        return problems + [str(exc)]
    problems += storage_problems(path, metadata)
    if not problems:  # the entries are well-formed: now what they describe
        problems += size_problems(path, metadata, info["model"]) or shape_problems(path, metadata, info["model"])
    return problems + extra_problems(path, int(info["world_size"]))


def link_problems(path: Path) -> list[str]:
    """Every file of the checkpoint lies in its folder. A link out of it would have the
    verification, the manifest and then a loader read a file the checkpoint does not hold."""
    folder = os.path.realpath(path)
    problems = []
    for entry in sorted(path.iterdir()):
        if entry.is_symlink() and os.path.dirname(os.path.realpath(entry)) != folder:
            problems.append(f"{entry} is a link to {os.readlink(entry)!r:.120}, outside the checkpoint folder "
                            "(a checkpoint's files are its own; copy them in)")
    return problems


def size_problems(path: Path, metadata, model: dict) -> list[str]:
    """The tensors recorded are no more than the model of sdtrain.json can have (with its
    optimizer state), so whoever loads them allocates what that model needs and no more.
    Runs after storage_problems, which checked every entry's type and chunks."""
    meta = path / METADATA
    params = model_params(model)
    if params is None:
        return [f"{path / INFO} records a model sdtrain cannot size ({str(model)[:120]})"]
    budget = STATE_COPIES * params + SMALL_STATE
    total = sum(_numel(entry.size) for entry in metadata.state_dict_metadata.values())
    if total > budget:
        return [f"{meta} records {total:,} tensor elements, more than a checkpoint of its model ({params:,} parameters, "
                f"{path / INFO}) can hold with its optimizer state ({budget:,}); refusing to allocate them "
                "(the file may be corrupt or crafted)"]
    for fqn, entry in metadata.state_dict_metadata.items():
        itemsize = entry.properties.dtype.itemsize
        for chunk in entry.chunks:
            length = metadata.storage_data[_index(fqn, chunk.offsets)].length
            if length > _numel(chunk.sizes) * itemsize + FRAMING_BYTES:
                return [f"{meta} records {length:,} bytes for {fqn!r:.80} at offsets {tuple(chunk.offsets)}, far more "
                        f"than its {_numel(chunk.sizes):,} elements take (the file may be corrupt or crafted)"]
    return []


def shape_problems(path: Path, metadata, model: dict) -> list[str]:
    """Every model weight recorded has the shape the model of sdtrain.json gives it (built on
    the meta device, as the worker builds it from the recipe: no memory). Export allocates
    these; a resume, whose recipe must hold that same model, is refused here with exit 2
    rather than by DCP in every worker."""
    import torch

    from sdtrain.model.gpt import GPT, GPTConfig

    try:
        with torch.device("meta"):
            shapes = {f"model.{k}": tuple(v.shape) for k, v in GPT(GPTConfig(**model)).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - values no model takes fail in many ways
        return [f"{path / INFO} records a model sdtrain cannot build ({type(exc).__name__}: {str(exc)[:120]})"]
    for fqn, entry in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and shapes.get(fqn) != tuple(entry.size):
            has = f"has it as {shapes[fqn]}" if fqn in shapes else "has no such weight"
            return [f"{path / METADATA} records {fqn!r:.80} as {tuple(entry.size)!r:.80}; the model of {path / INFO} {has} "
                    "(the file may be corrupt or crafted)"]
    return []


def model_params(model: dict) -> int | None:
    """The parameter count of a checkpoint's model (its sdtrain.json, input like the rest),
    or None if it is not a model shape sdtrain could have saved."""
    from sdtrain.model.size import count_params

    if not isinstance(model, dict):
        return None
    sizes = ("n_layers", "d_model", "seq_len", "vocab_size", "mlp_ratio")
    if not all(type(model.get(k)) is int and model[k] > 0 for k in sizes) or model["n_layers"] > MAX_LAYERS:
        return None
    moe = model.get("moe")
    if moe is not None and not (isinstance(moe, dict) and all(type(moe.get(k)) is int and moe[k] >= 0
                                                              for k in ("num_experts", "top_k", "every_n_layers"))):
        return None
    try:
        return count_params(SimpleNamespace(**{"bias": True, **model}))
    except (TypeError, KeyError, ValueError, ZeroDivisionError, AttributeError):
        return None


def _index(fqn: str, offsets):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn, offsets)


def storage_problems(path: Path, metadata) -> list[str]:
    """Every entry a tensor, every tensor chunk recorded, every record inside a file of
    this checkpoint that is long enough for it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    meta = path / METADATA
    problems, needed = [], {}
    try:
        for index, where in metadata.storage_data.items():
            if type(index) is not MetadataIndex or type(where) is not _StorageInfo:
                return [f"{meta} is damaged (a storage record {type(index).__name__}: {type(where).__name__})"]
            name, offset, length = where.relative_path, where.offset, where.length
            if not _plain_file_name(name) or not all(type(n) is int and n >= 0 for n in (offset, length)):
                problems.append(f"{meta} records {index.fqn!r:.80} at {name!r:.80}, bytes {offset!r:.20}+{length!r:.20}: "
                                "not a place in a file of this checkpoint")
            elif where.transform_descriptors:  # sdtrain writes none; each would be a decoder run on input
                problems.append(f"{meta} records {index.fqn!r:.80} as transformed ({where.transform_descriptors!r:.80})")
            else:
                needed[name] = max(needed.get(name, 0), offset + length)
        for name, end in sorted(needed.items()):
            file = path / name
            if not file.is_file():
                problems.append(f"{file} is missing ({meta} records data in it)")
            elif file.stat().st_size < end:
                problems.append(f"{file} is truncated: {file.stat().st_size} bytes, {meta} records data up to byte {end}")
        for fqn, entry in metadata.state_dict_metadata.items():
            if type(fqn) is not str or type(entry) is not TensorStorageMetadata:
                problems.append(f"{meta} holds {fqn!r:.80} as a {type(entry).__name__}: sdtrain checkpoints hold only "
                                "tensors (anything else would be unpickled at load)")
                continue
            problems += _chunk_problems(meta, fqn, entry, metadata.storage_data)
    except (AttributeError, TypeError, ValueError) as exc:  # fields of the wrong type
        problems.append(f"{meta} is damaged ({type(exc).__name__}: {str(exc)[:120]})")
    return problems


def _chunk_problems(meta: Path, fqn: str, entry, storage_data: dict) -> list[str]:
    """The chunks of a tensor cover it exactly, and each has its bytes recorded: so a loader
    that allocates the tensor the metadata describes allocates no more than the files hold."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    covered, itemsize = 0, entry.properties.dtype.itemsize
    for chunk in entry.chunks:
        where = storage_data.get(MetadataIndex(fqn, chunk.offsets))
        if where is None:
            return [f"{meta} records no data for {fqn!r:.80} at offsets {tuple(chunk.offsets)}"]
        if _numel(chunk.sizes) * itemsize > where.length:
            return [f"{meta} records {fqn!r:.80} at offsets {tuple(chunk.offsets)} as larger than its stored bytes"]
        covered += _numel(chunk.sizes)
    if covered != _numel(entry.size):
        return [f"{meta} records chunks of {fqn!r:.80} that do not cover its shape {tuple(entry.size)}"]
    return []


def _numel(shape) -> int:
    numel = 1
    for n in shape:
        if type(n) is not int or n < 0:
            raise ValueError(f"{n!r:.20} is not a dimension")
        numel *= n
    return numel


def extra_problems(path: Path, world_size: int) -> list[str]:
    """rank<R>.extra.pt of every rank that saved: present, and tensors and numbers only."""
    import torch

    if not 0 < world_size <= MAX_WORLD_SIZE:
        return [f"{path / 'sdtrain.json'} records world_size {world_size}, which no run has"]
    problems = []
    for rank in range(world_size):
        file = path / f"rank{rank}.extra.pt"
        if not file.is_file():
            problems.append(f"{file} is missing (the checkpoint was saved by {world_size} ranks)")
            continue
        if file.stat().st_size > MAX_EXTRA_BYTES:
            problems.append(f"{file} is {file.stat().st_size:,} bytes, not a rank's RNG and loss-scaler state "
                            "(the file may be corrupt or crafted)")
            continue
        try:
            extra = torch.load(file, weights_only=True)  # never anything but tensors and numbers
        except Exception as exc:  # noqa: BLE001 - damaged or crafted bytes fail in many ways
            problems.append(f"{file} is damaged or holds more than tensors and numbers "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})")
            continue
        if not isinstance(extra, dict):
            problems.append(f"{file} holds a {type(extra).__name__}, not this rank's state")
    return problems


def _plain_file_name(name) -> bool:
    """A file directly in the checkpoint folder: no path, no way out of it."""
    return type(name) is str and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


def newest_whole_checkpoint(run_dir: Path, problems: Callable[[Path], list[str]] = checkpoint_problems,
                            refused: dict | None = None) -> tuple[Path | None, list[str]]:
    """The newest of a run's checkpoints with no `problems` (`train.resume: auto`, and a
    restart), and why each newer one was skipped; (None, reasons) if none passes. A crash mid
    -save, a disk that lost a shard or flipped a byte then costs one checkpoint interval,
    not the run. `refused` ({identity: reason}) is a job's memory: a checkpoint refused once
    is skipped without a second look, and every refusal here is added to it."""

    def checked(path: Path) -> list[str]:
        if path.is_symlink():  # the run's own checkpoints are folders it saved, not links elsewhere
            return [f"{path} is a link to {os.readlink(path)!r:.120}, not a checkpoint saved in this run"]
        return problems(path)

    return first_passing(step_checkpoints(run_dir), checked, refused if refused is not None else {})


def first_passing(candidates: list[Path], problems: Callable[[Path], list[str]],
                  refused: dict) -> tuple[Path | None, list[str]]:
    """The first of `candidates` that has no problems and was not refused before; the
    reason each one before it was skipped."""
    skipped = []
    for path in candidates:
        key = identity(path)
        if key in refused:
            skipped.append(f"skipped checkpoint {path.name}: refused earlier in this job ({refused[key]})")
            continue
        found = problems(path)
        if not found:
            return path, skipped
        refused[key] = found[0]
        skipped.append(f"skipped checkpoint {path.name}: {found[0]}")
    return None, skipped
