"""Where training tokens come from: the embedded corpus, text, JSONL, or uint16 .bin files.

No torch here: the launcher runs `check_source` before it starts anything, so a missing
or empty data set is an exit-2 error and not a crash on every rank.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrain.errors import DataError

STDLIB = "stdlib"
BYTE_VOCAB = 256


@dataclass
class Corpus:
    train: np.ndarray  # 1-D token ids (uint8 for bytes, uint16/int32 otherwise; may be a memmap)
    val: np.ndarray
    description: str


def load_corpus(cfg, seq_len: int) -> Corpus:
    """Tokens of the recipe's `data` section, split into train and held-out validation."""
    fmt = detect_format(cfg)
    if fmt == "bin":
        return _load_bin(Path(cfg.source), cfg.val_fraction, seq_len)
    texts = list(_read_texts(cfg, fmt))
    tokenizer = _load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    if tokenizer is None:
        tokens = np.frombuffer(b"\n".join(t.encode("utf-8", "replace") for t in texts), np.uint8)
    else:
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(texts):
            ids.extend(encoding.ids)
        tokens = np.asarray(ids, dtype=np.int32)
    return _split(tokens, cfg.val_fraction, seq_len, f"{_name(cfg)} ({fmt})")


def check_source(cfg, seq_len: int, vocab_size: int) -> str:
    """Cheap checks the launcher runs before starting workers; returns a one-line summary."""
    fmt = detect_format(cfg)
    if fmt == "bin":
        corpus = _load_bin(Path(cfg.source), cfg.val_fraction, seq_len)
        vocab = int(max(corpus.train.max(), corpus.val.max())) + 1
    else:
        size = sum(len(t) for t in _read_texts(cfg, fmt))
        if size < 2 * (seq_len + 1):
            raise DataError(f"data.source {cfg.source}: only {size} bytes of text; need more than {2 * (seq_len + 1)}")
        vocab = _load_tokenizer(cfg.tokenizer).get_vocab_size() if cfg.tokenizer else BYTE_VOCAB
    if vocab > vocab_size:
        raise DataError(
            f"data.source {cfg.source} has token ids up to {vocab - 1} but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size to at least {vocab}"
        )
    return f"{_name(cfg)} ({fmt})"


def detect_format(cfg) -> str:
    if cfg.source == STDLIB:
        return "text"
    path = Path(cfg.source)
    if not path.exists():
        raise DataError(
            f"data.source {cfg.source} does not exist; give a text file, a folder, a .jsonl "
            f"file, a .bin token file or folder, or 'stdlib' for the embedded corpus"
        )
    if cfg.format != "auto":
        return cfg.format
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".bin" or (path.is_dir() and (path / "train.bin").exists()):
        return "bin"
    return "text"


def _name(cfg) -> str:
    return "embedded corpus: Python standard library sources" if cfg.source == STDLIB else cfg.source


def _read_texts(cfg, fmt: str):
    if cfg.source == STDLIB:
        yield from _read_files(_stdlib_files(), cfg.max_bytes)
        return
    path = Path(cfg.source)
    if fmt == "jsonl":
        yield from _read_jsonl(path)
        return
    files = list(_walk_sorted(path, suffix=None)) if path.is_dir() else [path]
    if not files:
        raise DataError(f"data.source {path} is an empty folder; put text files in it")
    yield from _read_files(files, cfg.max_bytes)


def _read_files(files, max_bytes: int):
    total = 0
    for file in files:
        text = Path(file).read_bytes()[: max_bytes - total].decode("utf-8", "replace")
        if text:
            yield text
        total += len(text)
        if total >= max_bytes:
            return


def _read_jsonl(path: Path):
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: each line needs a "text" string field')
            yield record["text"]


def _stdlib_files():
    root = Path(sysconfig.get_path("stdlib"))
    return (f for f in _walk_sorted(root, suffix=".py") if "site-packages" not in f.parts)


def _walk_sorted(root: Path, suffix: str | None):
    """Files below root in a fixed order (sorted per folder), so every rank reads the same."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if suffix is None or name.endswith(suffix):
                yield Path(folder) / name


def _load_bin(path: Path, val_fraction: float, seq_len: int) -> Corpus:
    if path.is_dir():
        train_file, val_file = path / "train.bin", path / "val.bin"
        train = _memmap(train_file)
        if val_file.exists():
            val = _memmap(val_file)
            _check_length(train, seq_len, train_file)
            _check_length(val, seq_len, val_file)
            return Corpus(train, val, f"{path} (bin)")
        return _split(train, val_fraction, seq_len, f"{path} (bin)")
    return _split(_memmap(path), val_fraction, seq_len, f"{path} (bin)")


def _memmap(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; a .bin folder needs train.bin (and optionally val.bin)")
    if path.stat().st_size % 2:
        raise DataError(f"{path} has an odd size; .bin files hold uint16 tokens (nanoGPT layout)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _split(tokens: np.ndarray, val_fraction: float, seq_len: int, description: str) -> Corpus:
    n_val = max(int(len(tokens) * val_fraction), seq_len + 2)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    _check_length(train, seq_len, description)
    return Corpus(train, val, description)


def _check_length(tokens: np.ndarray, seq_len: int, what) -> None:
    if len(tokens) < seq_len + 2:
        raise DataError(
            f"{what}: {len(tokens)} tokens is too little for seq_len {seq_len}; "
            "add data or lower model.seq_len"
        )


def _load_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"data.tokenizer {path} needs the tokenizers package: pip install 'sdtrain[tokenizers]'"
        ) from None
    if not Path(path).is_file():
        raise DataError(f"data.tokenizer {path} does not exist (a tokenizer.json file)")
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise DataError(f"data.tokenizer {path} could not be read: {exc}") from None
