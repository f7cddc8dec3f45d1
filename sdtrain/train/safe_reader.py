"""DCP loading that never unpickles arbitrary objects.

DCP loads tensors with `torch.load(weights_only=True)`, but its `.metadata` file goes
through plain `pickle.load`, and non-tensor values (an optimizer's hyperparameters)
through `torch.load(weights_only=False)`: either would run any callable a crafted
checkpoint names. The planner here loads values weights-only, and `.metadata` is read by
an unpickler that knows exactly the globals DCP writes and what each may be used for:

- the names are looked up whole, as (module, name) pairs: no prefix matching and no
  dotted attribute walk (protocol 4 would resolve `os.system` through any module that
  imports os), so no other object of those modules is reachable;
- only a few value constructors may be called (REDUCE): torch.Size, the layout and
  memory-format lookups, PosixPath; DCP's dataclasses may only be made empty (NEWOBJ) and
  filled (BUILD), and BUILD only ever fills such a fresh instance, never a class, a
  function or a shared object;
- the opcodes that reach objects by other ways (INST, OBJ, EXT*) are refused.

The set was read off real checkpoints of every strategy (plain, ZeRO 1-3 as ShardedTensors
and as DTensor boxes, bf16) written by torch 2.13; a checkpoint naming anything else is refused as crafted or
from a DCP this reader does not know.
"""

from __future__ import annotations

import io
import pickle
from functools import cache
from pathlib import Path, PosixPath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from sdtrain.errors import CheckpointError

# A .metadata is read whole, and a pickle's byte strings say their own length: bound it by the
# file (a sparse one can claim terabytes). Real ones: 24 KB for 2 ranks of a tiny model; about
# 100 bytes per tensor chunk, so ~100 MB for a 7B model's ZeRO-3 shards over 1,000 ranks.
MAX_METADATA_BYTES = 1 << 30

# DCP's record types: made empty by NEWOBJ and filled by BUILD, never called.
_RECORDS = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties",
                 "ChunkStorageMetadata", "BytesStorageMetadata")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo}

# Pure value constructors (a tuple, an enum value, a layout's name, a path's parts): callable.
_CONSTRUCTORS = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # a dict lookup
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"): dcp_metadata._MEM_FORMAT_ENCODING,
    ("pathlib", "PosixPath"): PosixPath,  # StorageMeta.checkpoint_id; no filesystem access
}


@cache
def _globals() -> dict[tuple[str, str], object]:
    """All a .metadata may name: the above, and every torch dtype as pickle names it
    (torch.float32 -> ("torch", "float32")), a value only."""
    dtypes = {("torch", str(v).removeprefix("torch.")): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    return {**dtypes, **_RECORDS, **_CONSTRUCTORS}


_RECORD_TYPES = frozenset(_RECORDS.values())
_RECORD_IDS = frozenset(id(cls) for cls in _RECORDS.values())
_CALLABLE = frozenset(id(f) for f in _CONSTRUCTORS.values())  # by identity: nothing on the stack can fake it


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, with its object-making opcodes checked (the C one cannot
    be checked per opcode). Slower, but a .metadata file is small next to the shards."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if (module, name) not in _globals():
            raise CheckpointError(
                f"checkpoint metadata refers to {module}.{name}, which is not checkpoint metadata; "
                "refusing to load it (the file may be corrupt or crafted)"
            )
        return _globals()[(module, name)]

    def _refuse(self, what: str):
        raise CheckpointError(f"checkpoint metadata {what}, which DCP never writes; refusing to load it "
                              "(the file may be corrupt or crafted)")

    def _reduce(self):
        func = self.stack[-2]
        if id(func) not in _CALLABLE:
            self._refuse(f"calls {func!r:.80}")
        pickle._Unpickler.load_reduce(self)

    def _newobj(self):
        if id(self.stack[-2]) not in _RECORD_IDS:
            self._refuse(f"makes a {self.stack[-2]!r:.80}")
        pickle._Unpickler.load_newobj(self)

    def _build(self):
        if type(self.stack[-2]) not in _RECORD_TYPES:  # exactly these types: never a class, a function, a dtype
            self._refuse(f"sets the state of {self.stack[-2]!r:.80}")
        pickle._Unpickler.load_build(self)

    def _other(self):
        self._refuse("uses an opcode that reaches objects by name (INST, OBJ, NEWOBJ_EX or EXT)")

    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.BUILD[0]] = _build
    for _opcode in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_opcode[0]] = _other
    del _opcode


def read_metadata_file(path: Path) -> Metadata:
    """A checkpoint's `.metadata`, unpickled with the allow-list above; CheckpointError naming
    the file if it is crafted, damaged or not DCP metadata."""
    too_big = CheckpointError(f"{path} is more than the {MAX_METADATA_BYTES:,} bytes checkpoint metadata takes; "
                              "refusing to read it (the file may be corrupt or crafted)")
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise too_big
    with open(path, "rb") as f:
        data = f.read(MAX_METADATA_BYTES + 1)
    if len(data) > MAX_METADATA_BYTES:
        raise too_big
    try:  # from memory: a length inside the pickle can then never ask for more than the file holds
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes can fail in any way
        raise CheckpointError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]})") from None
    if type(metadata) is not Metadata:
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata_file(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
