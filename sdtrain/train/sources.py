"""Where training tokens come from: the embedded corpus, text, JSONL, or uint16 .bin files.

No torch here: the launcher runs `check_source` before it starts anything, so a missing
or empty data set is an exit-2 error and not a crash on every rank.
"""

from __future__ import annotations

import itertools
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrain.errors import DataError
from sdtrain.user_files import open_regular, read_text

STDLIB = "stdlib"
BYTE_VOCAB = 256
MAX_TOKENIZER_BYTES = 1 << 28  # the largest tokenizer.json files published are tens of MB


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
    """The launcher's check before it starts workers; returns a one-line summary. It reads
    the corpus exactly as every worker will (load_corpus, bounded by max_bytes), so data the
    launcher accepts is data no worker refuses."""
    corpus = load_corpus(cfg, seq_len)
    if detect_format(cfg) == "bin":
        vocab = int(max(corpus.train.max(), corpus.val.max())) + 1
    else:
        vocab = _load_tokenizer(cfg.tokenizer).get_vocab_size() if cfg.tokenizer else BYTE_VOCAB
    if vocab > vocab_size:
        raise DataError(
            f"data.source {cfg.source} has token ids up to {vocab - 1} but model.vocab_size is "
            f"{vocab_size}; set model.vocab_size to at least {vocab}"
        )
    return corpus.description


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
    """The texts of the source, `max_bytes` of UTF-8 at most: never more is read from disk."""
    if cfg.source == STDLIB:
        # Python's own test suite holds files in other encodings on purpose: replace, not refuse.
        yield from _read_files(_stdlib_files(), cfg.max_bytes, errors="replace")
        return
    path = Path(cfg.source)
    if fmt == "jsonl":
        yield from _read_jsonl(path, cfg.max_bytes)
        return
    if not path.is_dir():
        yield from _read_files([path], cfg.max_bytes, what="data.source")
        return
    files = list(_walk_sorted(path, suffix=None))
    if not files:
        raise DataError(f"data.source {path} is an empty folder; put text files in it")
    yield from _read_files(files, cfg.max_bytes, what="data.source file")


def _read_files(files, max_bytes: int, errors: str = "strict", what: str = "file"):
    left = max_bytes
    for file in files:
        # open_regular: a FIFO or a device (a folder may hold one) is refused, not waited on
        # or read without end.
        try:
            with os.fdopen(open_regular(file, what, DataError), "rb") as f:
                data = f.read(left)
        except OSError as exc:
            raise DataError(f"cannot read {what} {file}: {exc.strerror}") from None
        if data:
            yield _decode(data, str(file), errors, cut=len(data) == left)
        left -= len(data)
        if left <= 0:
            return


def _read_jsonl(path: Path, max_bytes: int):
    """The "text" field of each record, until the texts add up to max_bytes. A line is read
    up to a bound too: a single multi-gigabyte line is an error, not a hang."""
    line_cap = 4 * max_bytes + 2**20  # JSON escapes take up to 6 bytes a character; most take 1
    left = max_bytes
    with os.fdopen(open_regular(path, "data.source", DataError), "rb") as f:
        for number in itertools.count(1):
            raw = f.readline(line_cap)
            if not raw:
                return
            if len(raw) == line_cap and not raw.endswith(b"\n"):
                raise DataError(f"{path}:{number}: the line is longer than {line_cap:,} bytes; split it into several "
                                "records, or raise data.max_bytes")
            line = _decode(raw, str(path), "strict", line=number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{number}: each line needs a "text" string field')
            text = record["text"].encode("utf-8", "replace")[:left]
            yield _decode(text, str(path), "replace")
            left -= len(text)
            if left <= 0:
                return


def _decode(data: bytes, source: str, errors: str, cut: bool = False, line: int | None = None) -> str:
    """UTF-8 text of `data`; a character cut in two by max_bytes at the end is dropped."""
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as exc:
        if cut and exc.end == len(data) and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8")
        at = line if line is not None else data[: exc.start].count(b"\n") + 1
        raise DataError(f"{source} line {at} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        "convert the file to UTF-8 (e.g. iconv -t utf-8)") from None


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
    if not path.exists():
        raise DataError(f"{path} is missing; a .bin folder needs train.bin (and optionally val.bin)")
    os.close(open_regular(path, "data.source file", DataError))  # a FIFO or a device is named as one
    if path.stat().st_size % 2:
        raise DataError(f"{path} has an odd size; .bin files hold uint16 tokens (nanoGPT layout)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    return np.memmap(path, dtype=np.uint16, mode="r")


def _split(tokens: np.ndarray, val_fraction: float, seq_len: int, description: str) -> Corpus:
    """Hold out the tail for validation: at least one window (seq_len + 2 tokens) on each side."""
    window = seq_len + 2
    if len(tokens) < 2 * window:
        raise DataError(
            f"{description}: {len(tokens):,} tokens is too little for seq_len {seq_len}: a training and a "
            f"validation window need 2 x (seq_len + 2) = {2 * window:,}; add data or lower model.seq_len"
        )
    n_val = max(int(len(tokens) * val_fraction), window)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    _check_length(train, seq_len, description)
    return Corpus(train, val, description)


def _check_length(tokens: np.ndarray, seq_len: int, what) -> None:
    if len(tokens) < seq_len + 2:
        raise DataError(
            f"{what}: {len(tokens):,} tokens is too little for seq_len {seq_len} (one window is seq_len + 2); "
            "add data or lower model.seq_len"
        )


def _load_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"data.tokenizer {path} needs the tokenizers package: pip install 'sdtrain[tokenizers]'"
        ) from None
    if not os.path.lexists(path):
        raise DataError(f"data.tokenizer {path} does not exist (a tokenizer.json file)")
    # read_text: a FIFO or a device is named as one (not "does not exist", not waited on), and
    # the file is read once, within a bound, for what the library then parses.
    text = read_text(path, "data.tokenizer", MAX_TOKENIZER_BYTES, "JSON", DataError)
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise DataError(f"data.tokenizer {path} could not be read: {exc}") from None
