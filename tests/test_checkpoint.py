"""Checkpoints: resume continues the same trajectory bitwise, saves are atomic, bad
checkpoints are refused with exit 2, loading never unpickles arbitrary objects."""

import io
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import crashed_copy, metrics, sdtrain
from sdtrain.errors import CheckpointError
from sdtrain.model import GPT, GPTConfig
from sdtrain.train.safe_reader import SafeFileSystemReader, _MetadataUnpickler


def test_checkpoint_layout(full_run):
    _, run_dir = full_run
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_10"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_10", "step_5"]
    info = json.loads((ckpts / "step_10" / "sdtrain.json").read_text())
    assert info["step"] == 10 and info["world_size"] == 2 and info["model"]["d_model"] == 32
    assert {"rank0.extra.pt", "rank1.extra.pt", ".metadata"} <= {p.name for p in (ckpts / "step_10").iterdir()}


def test_resume_is_bitwise_equal_to_uninterrupted(full_run, tmp_path):
    recipe, run_dir = full_run
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    expected = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(run_dir)]
    got = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(resumed)]
    assert got == expected  # bitwise: fp32 on CPU, same data position, same optimizer state


@pytest.mark.slow  # make test keeps the 2-rank resume (and the 4-rank reshards of test_tp_zero / test_pipeline)
def test_resume_at_four_ranks_is_bitwise_equal_to_uninterrupted(full_run, tmp_path):
    """At 3+ ranks the order in which gloo adds the ranks' gradients depends on DDP's bucket
    layout; a resumed run once averaged its first step in another layout than the
    uninterrupted run, and step 7's loss and gradient norm came out an ulp apart."""
    recipe, _ = full_run
    reference = tmp_path / "reference"
    result = sdtrain("launch", recipe, "--run-dir", reference, "--nproc-per-node", 4)
    assert result.returncode == 0, result.stderr
    resumed = crashed_copy(reference, tmp_path / "resumed")
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--nproc-per-node", 4, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    expected = [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(reference)]
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(resumed)] == expected


def test_resume_survives_a_crash_mid_save(full_run, tmp_path):
    """A save that died half-way leaves only a .partial folder; latest still names step 5."""
    recipe, run_dir = full_run
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    partial = resumed / "checkpoints" / "step_10.partial"
    shutil.copytree(run_dir / "checkpoints" / "step_10", partial)
    (partial / "__0_0.distcp").write_bytes(b"torn write")
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stderr
    assert metrics(resumed)[-1]["loss"] == metrics(run_dir)[-1]["loss"]
    assert not partial.exists()


@pytest.mark.slow  # keeps make test near 15 minutes
def test_resume_on_a_different_world_size(full_run, tmp_path):
    recipe, run_dir = full_run
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--set", "train.resume=auto",
                     "--nproc-per-node", 1)
    assert result.returncode == 0, result.stderr
    for a, b in zip(metrics(run_dir), metrics(resumed)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "tamper, override, expected",
    [
        (None, "train.resume=/does/not/exist", "does not exist"),
        (None, "model.d_model=64", "holds a different model (d_model: checkpoint 32 vs recipe 64)"),
        (None, "train.steps=5", "is at step 5 and train.steps is 5: nothing left to train"),
        ("rm-info", None, "is not an sdtrain checkpoint"),
        ("garble-info", None, "is damaged"),
    ],
)
def test_bad_resume_target_exits_2(full_run, tmp_path, tamper, override, expected):
    recipe, run_dir = full_run
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    info = resumed / "checkpoints" / "step_5" / "sdtrain.json"
    if tamper == "rm-info":
        info.unlink()
    elif tamper == "garble-info":
        info.write_text("{not json")
    target = resumed / "checkpoints" / "step_5"
    args = ["--set", f"train.resume={target}"] if override is None or not override.startswith("train.resume") else []
    if override:
        args += ["--set", override]
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "new", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "new").exists()


def test_crafted_metadata_is_not_unpickled(full_run, tmp_path):
    _, run_dir = full_run
    evil = tmp_path / "evil"
    shutil.copytree(run_dir / "checkpoints" / "step_5", evil)
    marker = tmp_path / "pwned"
    (evil / ".metadata").write_bytes(pickle.dumps(_Exploit(str(marker))))
    with pytest.raises(CheckpointError, match="not checkpoint metadata"):
        SafeFileSystemReader(evil).read_metadata()
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(os.system))).load()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_export_safetensors_loads_into_the_model(full_run, tmp_path):
    _, run_dir = full_run
    out = tmp_path / "model.safetensors"
    result = sdtrain("export", run_dir, out)
    assert result.returncode == 0, result.stderr
    weights = load_file(out)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=32, vocab_size=256))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to tok_emb.weight, stored once
    # the recipe's seed: the weights the run started from
    initial = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=32, vocab_size=256), seed=1337)
    text = torch.frombuffer(bytearray(b"def main():\n    return 0\n" * 3), dtype=torch.uint8).long()[:33]
    trained_loss = model.loss(model(text[None, :-1]), text[None, 1:])
    initial_loss = initial.loss(initial(text[None, :-1]), text[None, 1:])
    assert trained_loss < initial_loss - 0.5  # the exported weights are the trained ones

    assert sdtrain("export", tmp_path / "nope", out).returncode == 2
    assert sdtrain("export", run_dir, tmp_path / "model.bin").returncode == 2
