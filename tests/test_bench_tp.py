"""`sdtrain bench` with tensor parallelism (`tp<T>[-nosp][-zero<S>]`, and `pp<P>-<schedule>-tp<T>`):
names and the batch each runs, bad input refused with the recipe's message before anything runs,
and a real run beside PyTorch's DTensor tensor parallelism whose rows carry T, sequence
parallelism, TP's bytes per step and the ratio; and activation memory per rank (tp_activations.py)."""

import json
import subprocess
import sys

import pytest

from conftest import sdtrain
from sdtrain.bench.pipeline_strategy import parse_pipeline_strategy
from sdtrain.bench.tp_strategy import parse_tensor_strategy
from sdtrain.errors import UserInputError


def test_tp_strategy_names_and_batch():
    tp = parse_tensor_strategy("tp4-nosp-zero1")
    assert (tp.tp, tp.zero_stage, tp.sequence_parallel) == (4, 1, False)
    assert parse_tensor_strategy("tp2").sequence_parallel and parse_tensor_strategy("zero3") is None
    # the data-parallel rows' global batch 8 and accumulation 2, over dp = world / T replicas
    assert parse_tensor_strategy("tp2").overrides(8, 2, world=2)[-3:] == [
        "train.global_batch_size=8", "train.grad_accum_steps=2", "train.micro_batch_size=4"]
    assert parse_tensor_strategy("tp2").overrides(8, 2, world=4)[-1] == "train.micro_batch_size=2"
    assert "parallel.sequence_parallel=false" in tp.overrides(8, 1, world=4)
    with pytest.raises(UserInputError, match="does not divide the world size 2"):
        parse_tensor_strategy("tp4").overrides(8, 1, world=2)
    for bad in ("tp1", "tp2-foo", "tp2-zero4", "tp"):
        with pytest.raises(UserInputError):
            parse_tensor_strategy(bad)
    pipeline = parse_pipeline_strategy("pp2-1f1b-tp2-zero1")
    assert (pipeline.stages, pipeline.tp, pipeline.zero_stage) == (2, 2, 1)
    overrides = pipeline.overrides(8, world=4)  # 2 stages x tp 2: one replica of 4 micro-batches of 2
    assert "parallel.tensor_parallel=2" in overrides and overrides[-2:] == [
        "train.grad_accum_steps=4", "train.micro_batch_size=2"]
    assert parse_pipeline_strategy("pp2-1f1b").tp == 1


def test_bench_tp_bad_input_exits_2(write_recipe, tmp_path):
    recipe = write_recipe()  # 2 heads
    for strategies, nproc, reason in (("tp2-foo", "2", "tp<T>[-nosp][-zero<S>]"),
                                      ("tp4", "2", "does not divide the world size 2"),
                                      ("tp4", "4", "n_heads 2 is not divisible by parallel.tensor_parallel 4"),
                                      ("pp2-1f1b-tp2", "2", "does not divide the world size 2")):
        result = sdtrain("bench", recipe, "--strategies", strategies, "--nproc", nproc, "--steps", 15,
                         "--json", tmp_path / "never.json")
        assert result.returncode == 2 and reason in " ".join(result.stderr.split()), result.stderr
        assert not (tmp_path / "never.json").exists() and "tokens/s" not in result.stdout  # nothing ran


@pytest.mark.slow  # make test keeps the DTensor peer's own trajectory test (test_peer_dtensor_tp)
def test_bench_tp2_beside_dtensor_tp(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--strategies", "tp2", "--peers", "dtensor-tp", "--steps", 15,
                     "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    tp2, peer = json.loads(out.read_text())["results"]
    assert (tp2["name"], tp2["kind"], tp2["world_size"], tp2["tensor_parallel"], tp2["sequence_parallel"]) == (
        "tp2", "sdtrain", 2, 2, True)
    assert (peer["name"], peer["kind"], peer["tensor_parallel"], peer["sequence_parallel"]) == (
        "dtensor-tp2", "peer", 2, True)
    # TP's own traffic by kind, part of the step's bytes (tp = world: there is no data parallelism)
    assert set(tp2["tp_bytes_per_step"]) and min(tp2["tp_bytes_per_step"].values()) > 0
    assert sum(tp2["tp_bytes_per_step"].values()) <= tp2["comm_bytes_per_step"]
    assert len(tp2["peak_mem_gib"]) == 2 and len(tp2["model_state_bytes"]) == 2
    assert tp2["vs_dtensor-tp2"] == pytest.approx(tp2["tokens_per_s"] / peer["tokens_per_s"], abs=2e-3)
    assert tp2["paired_ratios"] == [tp2["vs_dtensor-tp2"]]  # run back to back
    assert "2+sp" in result.stdout and "dtensor-tp2 (peer)" in result.stdout


def test_activations_per_rank_shrink_with_tp_and_further_with_sequence_parallelism(tmp_path):
    out = tmp_path / "counts.json"
    # blocks large enough beside the head and loss for the blocks' share to show
    result = subprocess.run([sys.executable, "-m", "sdtrain.bench.tp_activations", "--tp", "2,4", "--n-layers", "2",
                             "--d-model", "128", "--n-heads", "4", "--seq-len", "512", "--json", out],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = json.loads(out.read_text())
    # tp splits heads and the MLP's hidden width; sequence parallelism also splits the norms'
    # and the residual stream's activations, and the column-parallel layers' kept inputs, along
    # the sequence: ~1/T of tp 1 (0.46 and 0.23 measured; about 0.51 and 0.31 when the column-parallel
    # layers kept their gathered inputs)
    assert counts["tp2+sp"] < counts["tp2"] < 0.65 * counts["tp1"]
    assert counts["tp2+sp"] < 0.5 * counts["tp1"] and counts["tp4+sp"] < 0.28 * counts["tp1"]
    assert "tp2+sp" in result.stdout and "of tp1" in result.stdout


@pytest.mark.slow
def test_bench_pipeline_with_tensor_parallelism(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--strategies", "pp2-1f1b-tp2", "--nproc", 4, "--steps", 15,
                     "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    (row,) = json.loads(out.read_text())["results"]
    # 2 stages x tp 2 on 4 workers: one replica, M = 2P = 4 micro-batches of the global 8
    assert (row["pipeline_stages"], row["tensor_parallel"], row["sequence_parallel"], row["micro_batches"]) == (
        2, 2, True, 4)
    assert row["tp_bytes_per_step"]["all_gather"] > 0 and len(row["peak_mem_gib"]) == 4
