"""Tensor parallelism with MoE layers against the one-process run of the same recipe: the
dense parts split over tp, each MoE layer whole on every tp rank (its experts split over ep
as without TP), routing the whole micro-batch. Real processes through `sdtrain launch` on
gloo, fp32, with capacity to spare (nothing drops).

The 4-rank run is TP = 2 x EP = 2 (dp 2: the ep pair of each tp rank) with sequence
parallelism, where the layer gathers the sequence around itself (tp_moe.py)."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import TINY, launch_run, merge, metrics
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.model.moe.layer import MoESettings
from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel
from sdtrain.train.export import load_model_weights
from test_moe import MOE, SPARE
from test_moe import assert_same_run as assert_same_moe_run

REL_TOL = 1e-5  # fp32 on CPU: only the order of the sums differs
STEPS = 10
RESUME_AT = 5
RUN = merge(MOE, {"train": {"steps": STEPS}, "checkpoint": {"at_end": True, "every": RESUME_AT, "keep": 2}})
TP2_EP2 = ("parallel.tensor_parallel=2", "parallel.expert_parallel=2")


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, RUN), SPARE, *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("tp-moe-ref"), "single", 1)


@pytest.fixture(scope="module")
def tp2_ep2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("tp2-ep2"), "tp2ep2", 4, *TP2_EP2)


def assert_same_run(reference, run_dir, steps=range(1, STEPS + 1)):
    """test_moe's comparison (loss, the clipping norm counting each expert and each tp piece
    once, the same tokens dropped), and the MoE numbers, ratios over every rank in which the
    tp copies of a layer count T times in both parts."""
    assert_same_moe_run(reference, run_dir, steps)
    expected = {m["step"]: m for m in metrics(reference) if "loss" in m}
    got = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    for step in steps:
        a, b = expected[step], got[step]
        for key in ("moe_aux_loss", "moe_z_loss", "moe_load_min", "moe_load_max", "eval_loss"):
            if key in a:  # eval_loss: at the last step (eval routes with its own capacity factor)
                assert abs(a[key] - b[key]) <= REL_TOL * abs(a[key]), f"step {step}: {key} {a[key]} vs {b[key]}"


def assert_same_weights(reference, run_dir):
    """The final checkpoints loaded whole: the tp pieces and the ep slices of the experts sit
    where the one-process tensors are."""
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys()
    assert ours["blocks.1.mlp.experts.w1"].shape == (4, 32, 128)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


def test_tp2_ep2_with_sequence_parallel_matches_one_process(reference, tp2_ep2):
    assert metrics(reference)[-1]["moe_dropped"] == 0
    assert_same_run(reference, tp2_ep2)
    assert_same_weights(reference, tp2_ep2)
    assert 0 <= metrics(tp2_ep2)[-1]["moe_all_to_all_share"] <= 1  # a mean over ranks, tp copies included


def test_tp2_with_moe_without_sequence_parallel_matches_one_process(reference, tmp_path):
    run_dir = launch(tmp_path, "tp2", 2, "parallel.tensor_parallel=2", "parallel.sequence_parallel=false")
    assert_same_run(reference, run_dir)


def test_a_tp2_ep2_checkpoint_continues_at_one_process(reference, tp2_ep2, tmp_path):
    resumed = tmp_path / "one"
    shutil.copytree(tp2_ep2, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{RESUME_AT}")
    (resumed / "metrics.jsonl").unlink()
    assert launch(tmp_path, "one", 1, "train.resume=auto") == resumed
    assert_same_run(reference, resumed, steps=range(RESUME_AT + 1, STEPS + 1))
    assert_same_weights(reference, resumed)


# --- slow: the rest of the matrix -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    [*TP2_EP2, "parallel.zero_stage=1"],
    [*TP2_EP2, "parallel.zero_stage=3"],
    [*TP2_EP2, "train.activation_checkpointing=true"],  # the recompute gathers the sequence again
    ["parallel.tensor_parallel=2", "parallel.pipeline.stages=2"],  # the MoE block on the second stage
], ids=["zero1", "zero3", "checkpointed", "pp2"])
def test_tp2_with_moe_in_other_layouts_matches_one_process(reference, tmp_path, overrides):
    assert_same_run(reference, launch(tmp_path, "run", 4, *overrides))


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["model.moe.capacity_factor=1.0", "model.moe.balance=bias"],
                         ids=["drops", "bias-balance"])
def test_tp2_ep2_drops_and_bias_balance_as_one_process(tmp_path, setting):
    """The same tokens compete for capacity on every tp rank as in one process, so the same
    ones drop; the bias balancer sees the same load."""
    single = launch(tmp_path, "single", 1, setting)
    run_dir = launch(tmp_path, "run", 4, *TP2_EP2, setting)
    if "capacity" in setting:
        assert metrics(single)[-1]["moe_dropped"] > 0
    assert_same_run(single, run_dir)


# --- in process: what the plan says of an MoE layer's parameters ------------------------------

def test_moe_parameters_are_whole_and_not_partial_sums_under_sequence_parallel():
    """Their gradients are complete on every tp rank (the layer saw the whole sequence), so
    the sum over tp must leave them out: summed, they would count T times."""
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=64,
                    moe=MoESettings(num_experts=4, every_n_layers=2))
    model = GPT(cfg, seed=0)
    plan = apply_tensor_parallel(model, TensorParallel(None, 2, 0, sequence_parallel=True))
    moe = {name for name in plan.shards if ".mlp.router." in name or ".mlp.experts." in name}
    assert moe and all(plan.shards[name] is None for name in moe)
    assert not moe & set(plan.partial_grads)
    assert "blocks.1.ln_mlp.weight" in plan.partial_grads  # the dense whole ones still are
