"""The files of a Hugging Face model folder, read as untrusted data. Torch-free (the launcher
checks a folder with it before anything starts).

A folder holds config.json and its weights as one `model.safetensors`, or as shards listed in
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file name). Every JSON
file is read with a size bound; a shard's name must be a plain file name inside the folder
(never a path out of it); only safetensors are read (no pickle, so no code runs on load),
and of each file first its header: the names, dtypes and shapes of its tensors, which are
checked against the model before a byte of weights is read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import UserInputError, printable

MAX_JSON_BYTES = 16 * 2**20  # an index of a 400B-parameter model is a few hundred KiB
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on a file's header
MAX_SHARDS = 10_000
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8}
FIX = "give a Hugging Face model folder (save_pretrained's: config.json and model.safetensors)"


class HFFolderError(UserInputError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # safetensors' name: F32, BF16, F16, ...
    shape: tuple[int, ...]


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, at most MAX_JSON_BYTES, with no NaN or Infinity."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise HFFolderError(f"{printable(path.parent)} has no {path.name}; {FIX}") from None
    except OSError as exc:
        raise HFFolderError(f"cannot read {printable(path)}: {exc.strerror}") from None
    if len(data) > MAX_JSON_BYTES:
        raise HFFolderError(f"{printable(path)} is larger than {MAX_JSON_BYTES // 2**20} MiB; it cannot be {what}")
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise HFFolderError(f"{printable(path)} is not valid JSON ({printable(str(exc)[:80])}); it should be {what}") from None
    if not isinstance(value, dict):
        raise HFFolderError(f"{printable(path)} holds a {type(value).__name__}, not a JSON object; it should be {what}")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: the single file, or the index's shards."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if not (folder / INDEX).is_file():
        kept = sorted(p.name for p in folder.glob("*.bin"))[:1] if folder.is_dir() else []
        pickled = f" ({printable(kept[0])} is a pickle file, which sdtrain never loads: convert it to safetensors)" if kept else ""
        raise HFFolderError(f"{printable(folder)} has neither {WEIGHTS} nor {INDEX}{pickled}; {FIX}")
    weight_map = read_json(folder / INDEX, "a safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFFolderError(f"{printable(folder / INDEX)} has no `weight_map` of tensor names to file names")
    shards = sorted(set(weight_map.values()))
    if len(shards) > MAX_SHARDS:
        raise HFFolderError(f"{printable(folder / INDEX)} names {len(shards)} shard files; at most {MAX_SHARDS} are read")
    for shard in shards:
        if Path(shard).name != shard or shard in (".", "..") or not shard.endswith(".safetensors"):
            raise HFFolderError(f"{printable(folder / INDEX)} names shard {printable(shard)!r}: a shard must be a "
                                f".safetensors file name inside the folder, not a path")
        if not (folder / shard).is_file():
            raise HFFolderError(f"{printable(folder / INDEX)} names shard {printable(shard)}, which is not in the folder")
    return [folder / shard for shard in shards]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file holds, from its header alone (8 bytes of length, then
    JSON), each checked to lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise HFFolderError(f"{printable(path)} is not a safetensors file (its header length is wrong)")
            header = json.loads(f.read(length), parse_constant=_no_constant)
    except OSError as exc:
        raise HFFolderError(f"cannot read {printable(path)}: {exc.strerror}") from None
    except ValueError:
        raise HFFolderError(f"{printable(path)} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise HFFolderError(f"{printable(path)} is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (all(type(n) is int and n >= 0 for n in shape) and type(start) is int and type(end) is int
                  and 0 <= start <= end <= data_bytes)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise HFFolderError(f"{printable(path)}: the header entry of tensor {printable(name)[:80]} is malformed")
        if dtype not in FLOAT_BYTES:
            raise HFFolderError(f"{printable(path)}: tensor {printable(name)[:80]} is {printable(dtype)[:10]}; model "
                                f"weights are read from {', '.join(FLOAT_BYTES)} only")
        if end - start != math.prod(shape) * FLOAT_BYTES[dtype]:
            raise HFFolderError(f"{printable(path)}: tensor {printable(name)[:80]}'s bytes do not match its shape "
                                f"{list(shape)} and dtype {dtype}")
        tensors[name] = TensorEntry(path, dtype, shape)
    return tensors


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's weights, by name, from the headers alone."""
    tensors: dict[str, TensorEntry] = {}
    for path in weight_files(folder):
        tensors.update(read_header(path))
    return tensors
