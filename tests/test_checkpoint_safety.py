"""A checkpoint someone else made: crafted metadata never runs code, a damaged checkpoint is
refused with exit 2 before anything loads it, export never writes over a file unasked or
leaves half a file. And a run's own records: metrics.jsonl survives a torn last line, and
a NaN is written as null (strict JSON) with the fact kept in "nonfinite"."""

import io
import json
import os
import pickle
import resource
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.metadata import Metadata

from conftest import crashed_copy, metrics, sdtrain
from sdtrain.errors import CheckpointError
from sdtrain.train.checkpoint_manifest import MANIFEST, file_digest
from sdtrain.train.checkpoint_verify import checkpoint_problems
from sdtrain.train.export import check_output
from sdtrain.train.safe_reader import _MetadataUnpickler, read_metadata_file
from sdtrain.train.strict_json import strict_record


class _Exploit:
    """Pickles as a call of os.system: what a hostile file would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _value(value) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return (b"X" if isinstance(value, str) else b"B") + struct.pack("<I", len(data)) + data  # BINUNICODE, BINBYTES


def crafted_call(module: str, name: str, *args) -> bytes:
    """A protocol-4 pickle that calls module.name(*args), written opcode by opcode:
    STACK_GLOBAL resolves a dotted name by walking attributes."""
    return b"\x80\x04" + _value(module) + _value(name) + b"\x93(" + b"".join(map(_value, args)) + b"tR."


def words(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def payloads(where):
    """The marker file every payload would create, and each crafted .metadata by name."""
    marker = where / "pwned"
    touch = f"touch {marker}"
    evil_pt = where / "evil.pt"
    torch.save(_Exploit(marker), evil_pt)
    return marker, {
        "dotted name through dcp.metadata": crafted_call("torch.distributed.checkpoint.metadata", "os.system", touch),
        "dotted name through dcp.filesystem": crafted_call("torch.distributed.checkpoint.filesystem", "os.system", touch),
        "dotted name through dcp.format_utils": crafted_call("torch.distributed.checkpoint.format_utils", "os.system", touch),
        # a function of an allowed module that torch.loads a file with weights_only=False
        "REDUCE on a dcp function": crafted_call("torch.distributed.checkpoint.format_utils", "torch_save_to_dcp",
                                                 str(evil_pt), str(where / "converted")),
        # a pickle inside the pickle, handed to an unrestricted unpickler
        "nested pickle": crafted_call("torch.distributed.checkpoint.filesystem", "pickle.loads", pickle.dumps(_Exploit(marker))),
        "plain os.system": pickle.dumps(_Exploit(marker)),
    }


# Each payload goes through one real command (alternating: a CLI run costs seconds), and
# through the check both commands make, in-process.
PAYLOADS = {
    "dotted name through dcp.metadata": "export",
    "dotted name through dcp.filesystem": "launch",
    "dotted name through dcp.format_utils": "export",
    "REDUCE on a dcp function": "launch",
    "nested pickle": "export",
    "plain os.system": "launch",
}


def checkpoint_copy(full_run, dest):
    """A private copy of the step-5 checkpoint, to damage."""
    _, run_dir = full_run
    shutil.copytree(run_dir / "checkpoints" / "step_5", dest)
    return dest


@pytest.mark.parametrize("payload, command", PAYLOADS.items())
def test_crafted_metadata_runs_nothing(full_run, tmp_path, payload, command):
    recipe, _ = full_run
    marker, crafted = payloads(tmp_path)
    evil = checkpoint_copy(full_run, tmp_path / "evil")
    (evil / ".metadata").write_bytes(crafted[payload])
    (evil / MANIFEST).unlink()  # an attacker would rewrite it; the metadata must be refused on its own

    problems = checkpoint_problems(evil)
    assert len(problems) == 1 and "(the file may be corrupt or crafted)" in problems[0], problems
    if command == "export":
        result = sdtrain("export", evil, tmp_path / "out.safetensors")
    else:
        result = sdtrain("launch", recipe, "--run-dir", tmp_path / "new", "--set", f"train.resume={evil}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{evil / '.metadata'}:" in words(result.stderr) and "use an earlier checkpoint" in words(result.stderr)
    assert not marker.exists() and not (tmp_path / "converted").exists()
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "new").exists()


def test_allowed_globals_cannot_be_called_or_changed():
    """Even the names the metadata may use are only values and fresh records: no call of a
    record class, no BUILD on a class (which would set attributes on it process-wide)."""
    metadata = ("torch.distributed.checkpoint.metadata", "Metadata")
    set_class_attr = b"\x80\x04" + _value(metadata[0]) + _value(metadata[1]) + b"\x93N}" + \
        _value("sdtrain_pwned") + b"K\x01s\x86b."  # BUILD(Metadata, (None, {"sdtrain_pwned": 1}))
    call_record = crafted_call(*metadata, "x")
    call_dtype = crafted_call("torch", "float32", "x")
    for data in (set_class_attr, call_record, call_dtype):
        with pytest.raises(CheckpointError, match="crafted"):
            _MetadataUnpickler(io.BytesIO(data)).load()
    assert "sdtrain_pwned" not in vars(Metadata)


@pytest.mark.parametrize(
    "damage, bad_file",
    [
        ("truncate-shard", "__0_0.distcp"),
        ("truncate-shard-no-manifest", "__0_0.distcp"),
        ("flip-byte", "__1_0.distcp"),
        ("remove-shard", "__1_0.distcp"),
        ("garble-metadata", ".metadata"),
        ("remove-metadata", ".metadata"),
        ("evil-extra", "rank1.extra.pt"),
        ("remove-extra", "rank0.extra.pt"),
    ],
)
def test_damaged_checkpoint_problems_name_the_file(full_run, tmp_path, damage, bad_file):
    ckpt = checkpoint_copy(full_run, tmp_path / "ckpt")
    assert checkpoint_problems(ckpt) == []
    target = ckpt / bad_file
    if damage.startswith("truncate"):
        os.truncate(target, target.stat().st_size // 2)
        if damage.endswith("no-manifest"):
            (ckpt / MANIFEST).unlink()  # a checkpoint from before manifests: the metadata's offsets still tell
    elif damage == "flip-byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage.startswith("remove"):
        target.unlink()
    elif damage == "garble-metadata":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "evil-extra":  # extra files are loaded weights-only: refused, and nothing runs
        torch.save({"rng_cpu": _Exploit(tmp_path / "pwned")}, target)
        (ckpt / MANIFEST).unlink()
    problems = checkpoint_problems(ckpt)
    assert problems and any(str(target) in p for p in problems), problems
    assert not (tmp_path / "pwned").exists()


def test_damaged_checkpoint_exits_2_before_any_worker(full_run, tmp_path):
    recipe, _ = full_run
    ckpt = checkpoint_copy(full_run, tmp_path / "ckpt")
    shard = ckpt / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 1000)
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "new", "--set", f"train.resume={ckpt}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{shard} has" in words(result.stderr) and "use an earlier checkpoint" in words(result.stderr)
    assert not (tmp_path / "new").exists()

    (ckpt / "__1_0.distcp").unlink()
    result = sdtrain("checkpoint", "verify", ckpt)
    assert result.returncode == 2 and str(shard) in words(result.stderr) and str(ckpt / "__1_0.distcp") in words(result.stderr)


def test_saved_checkpoint_has_a_manifest_and_reads_as_dcp_wrote_it(full_run):
    _, run_dir = full_run
    for ckpt in (run_dir / "checkpoints" / "step_5", run_dir / "checkpoints" / "step_10"):
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        assert set(files) == {p.name for p in ckpt.iterdir()} - {MANIFEST}
        assert all(files[p.name] == file_digest(p) for p in ckpt.iterdir() if p.name != MANIFEST)
        assert checkpoint_problems(ckpt) == []
        with open(ckpt / ".metadata", "rb") as f:  # our own file: plain pickle is the reference
            assert read_metadata_file(ckpt / ".metadata") == pickle.load(f)


def test_export_refuses_to_overwrite_and_checks_out_first(full_run, tmp_path):
    _, run_dir = full_run
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"precious")
    marker, crafted = payloads(tmp_path)
    evil = checkpoint_copy(full_run, tmp_path / "evil")
    (evil / ".metadata").write_bytes(crafted["plain os.system"])
    result = sdtrain("export", evil, out)  # OUT is refused before the checkpoint is opened
    assert result.returncode == 2 and "already exists" in words(result.stderr) and "--force" in result.stderr
    assert out.read_bytes() == b"precious" and not marker.exists()

    result = sdtrain("export", run_dir, out, "--force")
    assert result.returncode == 0, result.stderr
    assert "tok_emb.weight" in load_file(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["evil.pt", "model.safetensors"]

    with pytest.raises(CheckpointError, match="not a writable folder"):
        check_output(out / "inside-a-file.safetensors", force=True)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is a directory"):
        check_output(tmp_path / "folder.safetensors", force=True)


def test_export_that_fails_mid_write_leaves_no_half_file(full_run, tmp_path):
    """A file-size limit makes the write fail half-way, as a full disk would."""
    _, run_dir = full_run
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))  # noqa: E731
    result = sdtrain("export", run_dir, tmp_path / "model.safetensors", preexec_fn=limit)
    assert result.returncode == 1, result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary file


def _strict(text):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_resume_past_a_torn_metrics_line_into_divergence(full_run, tmp_path):
    """One launch for two things: the resume drops a half-written last line of metrics.jsonl
    with a note, and with lr 1e30 the weights overflow after one step, so loss, grad norm
    and eval turn NaN: written as null, named in "nonfinite", the files strict JSON
    (train.on_nonfinite skip: the run goes on, skipping the NaN steps' updates)."""
    recipe, run_dir = full_run
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss": 3.4')  # a crash mid-write
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--set", "train.resume=auto", "--set", "train.lr=1.0e+30",
                     "--set", "train.on_nonfinite=skip")
    assert result.returncode == 0, result.stderr
    assert "line 11 is not a whole metrics record" in words(result.stdout)
    rows = [_strict(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[:5] == metrics(run_dir)[:5]  # what the resume kept is what was there
    assert rows[-1]["loss"] is None and {"loss", "grad_norm", "eval_loss"} <= set(rows[-1]["nonfinite"])
    summary = _strict((resumed / "summary.json").read_text())
    assert summary["final_loss"] is None and summary["eval_losses"] == [[10, None]]
    assert {"final_loss", "eval_losses"} <= set(summary["nonfinite"])


def test_strict_record():
    nan, inf = float("nan"), float("inf")
    assert strict_record({"step": 1, "loss": 2.0}) == {"step": 1, "loss": 2.0}
    assert strict_record({"step": 1, "loss": nan, "x": [1.0, -inf], "y": {"z": inf}}) == {
        "step": 1, "loss": None, "x": [1.0, None], "y": {"z": None}, "nonfinite": ["loss", "x", "y"]}
    # a record read back and written again keeps what it said
    assert strict_record({"loss": None, "mfu": nan, "nonfinite": ["loss"]})["nonfinite"] == ["loss", "mfu"]
