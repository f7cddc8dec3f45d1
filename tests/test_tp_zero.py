"""Tensor parallelism with ZeRO 1, 2 and 3 (TP=2 x DP=2, sequence parallel on: each tp rank's
ZeRO shards its pieces over its dp group) against the one-process run of the same recipe, on
real processes through `sdtrain launch`; and checkpoints that hold whole tensors, so a TP x
ZeRO run and a plain ZeRO-3 DP=4 run continue each other's trajectories."""

import shutil

import pytest
import torch

from conftest import TINY, launch_run, losses, merge, metrics
from sdtrain.model import GPTConfig, count_params
from sdtrain.parallel.tp_volume import tp_step_bytes
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5
STEPS = 20
RESUME_AT = 10
# TINY's 2 heads: one per tp rank; fp32; a checkpoint halfway and at the end.
TP_ZERO = {"train": {"steps": STEPS}, "checkpoint": {"at_end": True, "every": RESUME_AT, "keep": 3}}
TP2_DP2 = ("parallel.tensor_parallel=2", "parallel.sequence_parallel=true")


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, TP_ZERO), *overrides)


def tp_zero(tmp, stage):
    # Small buckets (several units per model, each with its own partial-over-tp sum at
    # stages 1/2); at stage 3 the norms and biases stay whole under the persistence threshold.
    return launch(tmp, f"tp2_zero{stage}", 4, *TP2_DP2, f"parallel.zero_stage={stage}",
                  "parallel.zero.reduce_bucket_mb=0.01", "parallel.zero.persistence_threshold=100")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ref"), "single", 1)


@pytest.fixture(scope="module")
def tp_zero1(tmp_path_factory):
    return tp_zero(tmp_path_factory.mktemp("z1"), 1)


def assert_same_losses(reference, run_dir, steps=range(1, STEPS + 1)):
    expected, got = dict(enumerate(losses(reference), 1)), dict(enumerate(losses(run_dir), 1))
    assert len(expected) == STEPS and sorted(got) == list(range(1, STEPS + 1))
    for step in steps:
        assert abs(expected[step] - got[step]) <= REL_TOL * abs(expected[step]), \
            f"step {step}: single process {expected[step]} vs {got[step]}"


def assert_same_weights(reference, run_dir):
    """The final checkpoints, consolidated: every tensor whole, as the one process holds it."""
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys()
    for name in ours:
        # atol: the key bias has a zero gradient, which Adam turns into ~1e-6 noise (see test_ddp)
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


def test_tp2_zero1_matches_single_process(reference, tp_zero1):
    assert_same_losses(reference, tp_zero1)
    assert_same_weights(reference, tp_zero1)


def test_tp2_zero1_counts_tp_traffic_beside_zero_traffic(tp_zero1):
    """A step's bytes on a rank: ZeRO-1's reduce-scatter and all-gather of the rank's pieces
    (2 x its parameters); the layers' tp collectives, by kind, as Megatron counts them
    (tp_volume.py); and the sum over tp of the dp-reduced shard of the tp-replicated weights'
    partial gradients (one unit of them here, half of them on each dp rank)."""
    psi, element = count_params(GPTConfig(**TINY["model"])), 4
    # whole on every tp rank: the position embedding, each block's norms and row-parallel biases, ln_f
    whole = 32 * 32 + 2 * (4 * 32 + 2 * 32) + 2 * 32
    local = whole + (psi - whole) // 2
    tokens = TINY["train"]["global_batch_size"] // 2 * TINY["model"]["seq_len"]  # a dp rank's share of the batch
    layers = tp_step_bytes(TINY["model"]["n_layers"], tokens, TINY["model"]["d_model"], sequence_parallel=True)
    rows = [row for row in metrics(tp_zero1) if "tp_bytes" in row]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows[1:]:  # step 1's count holds the step-0 eval's forward too
        assert row["tp_bytes"] == {**layers, "all_reduce_grads": whole // 2 * element}, row["step"]
        zero = row["comm_bytes"] - sum(row["tp_bytes"].values())
        assert abs(zero - 2 * local * element) <= 0.01 * 2 * local * element, f"step {row['step']}: {zero}"


@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])  # and zero1 below
def test_tp2_zero_matches_single_process(reference, tmp_path, stage):
    run_dir = tp_zero(tmp_path, stage)
    assert_same_losses(reference, run_dir)
    assert_same_weights(reference, run_dir)


def resume(source, tmp_path, name, nproc, *overrides):
    """Continue `source`'s step-10 checkpoint in a run of another shape."""
    resumed = tmp_path / name
    shutil.copytree(source, resumed)
    for step in range(RESUME_AT + 1, STEPS + 1):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step}", ignore_errors=True)
    (resumed / "checkpoints" / "latest").write_text(f"step_{RESUME_AT}")
    assert launch(tmp_path, name, nproc, *overrides, "train.resume=auto") == resumed
    return resumed


def test_tp2_zero1_checkpoint_continues_at_zero3_dp4(reference, tp_zero1, tmp_path):
    resumed = resume(tp_zero1, tmp_path, "dp4_zero3", 4, "parallel.zero_stage=3")
    assert_same_losses(reference, resumed, steps=range(RESUME_AT + 1, STEPS + 1))
    assert_same_weights(reference, resumed)


@pytest.mark.slow
def test_single_process_checkpoint_continues_at_tp2_zero3(reference, tmp_path):
    resumed = resume(reference, tmp_path, "tp2_zero3", 4, *TP2_DP2, "parallel.zero_stage=3")
    assert_same_losses(reference, resumed, steps=range(RESUME_AT + 1, STEPS + 1))
    assert_same_weights(reference, resumed)
