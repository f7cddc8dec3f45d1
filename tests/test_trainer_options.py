"""Trainer options against the plain fp32 run of the same recipe: activation checkpointing
changes nothing numerically, bf16 tracks fp32, torch.compile matches eager."""

import pytest

from conftest import losses, sdtrain
from sdtrain.train.export import load_model_weights


def run(write_recipe, tmp_path, name, *overrides, nproc=1):
    run_dir = tmp_path / name
    args = ["launch", write_recipe({"checkpoint": {"at_end": True}}), "--run-dir", run_dir, "--nproc-per-node", nproc]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def test_activation_checkpointing_is_exact(write_recipe, tmp_path):
    plain = run(write_recipe, tmp_path, "plain")
    recomputed = run(write_recipe, tmp_path, "ac", "train.activation_checkpointing=true", nproc=2)
    for a, b in zip(losses(plain), losses(recomputed)):
        assert abs(a - b) <= 1e-5 * abs(a)
    # Checkpoints keep plain parameter names, so they load with or without the wrapper.
    weights, _ = load_model_weights(recomputed)
    assert not [name for name in weights if "checkpoint" in name]
    assert weights.keys() == load_model_weights(plain)[0].keys()


@pytest.mark.slow  # keeps make test near 15 minutes
def test_bf16_tracks_fp32(write_recipe, tmp_path):
    fp32 = losses(run(write_recipe, tmp_path, "fp32"))
    bf16 = losses(run(write_recipe, tmp_path, "bf16", "train.precision=bf16"))
    assert bf16 != fp32  # autocast really ran in bf16
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.02 * a  # bf16 keeps ~3 significant digits


@pytest.mark.slow  # keeps make test near 15 minutes
def test_fp16_with_loss_scaling_trains(write_recipe, tmp_path):
    fp32 = losses(run(write_recipe, tmp_path, "fp32"))
    fp16 = losses(run(write_recipe, tmp_path, "fp16", "train.precision=fp16"))
    assert fp16[-1] < fp16[0]
    for a, b in zip(fp32, fp16):
        assert abs(a - b) <= 0.02 * a


@pytest.mark.slow
def test_compile_matches_eager(write_recipe, tmp_path):
    eager = losses(run(write_recipe, tmp_path, "eager"))
    compiled = losses(run(write_recipe, tmp_path, "compiled", "train.compile=true"))
    for a, b in zip(eager, compiled):
        assert abs(a - b) <= 1e-4 * a
