"""`manifest.json`: the name, size and sha256 of every file of a checkpoint, written last.

It tells a whole checkpoint from one that a full disk, a crash during a copy or a bad
sector has damaged. It is not a signature: whoever can write the checkpoint can rewrite
the manifest (that is what the metadata allow-list is for), and a checkpoint from before
manifests has none; both are still checked file by file (checkpoint_verify.py).

Torch-free: the launcher checks a resume target with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"


def file_digest(path: Path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def digests(paths: list[Path]) -> dict[str, dict]:
    """{file name: {size, sha256}}; hashlib releases the GIL, so files hash in parallel."""
    workers = max(1, min(8, len(paths), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_digest, paths)))


def write_manifest(directory: Path, known: dict[str, dict]) -> None:
    """Record every file of `directory`: `known` digests as given (each rank hashed the files
    it wrote), the rest hashed here. Call it after the last other file is written."""
    rest = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name not in known and p.name != MANIFEST]
    files = {**known, **digests(rest)}
    text = json.dumps({"version": 1, "files": dict(sorted(files.items()))}, indent=1)
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)


def manifest_problems(directory: Path, checksums: bool = True) -> list[str]:
    """What disagrees with the manifest: a missing file, another size, another sha256 (with
    `checksums`). No manifest, no problem: checkpoints before it had none."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return []
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{manifest} is damaged ({type(exc).__name__}: {str(exc)[:120]})"]
    problems, to_hash = [], []
    for name, (size, _) in expected.items():
        path = directory / name
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{manifest} names {name!r:.80}, not a file of the checkpoint")
        elif not path.is_file():
            problems.append(f"{path} is missing (the manifest lists it)")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest records {size} (truncated or overwritten)")
        else:
            to_hash.append(path)
    if checksums:
        for name, digest in digests(to_hash).items():
            if digest["sha256"] != expected[name][1]:
                problems.append(f"{directory / name} has another sha256 than the manifest records (the file is damaged)")
    return problems
