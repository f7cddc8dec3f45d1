"""Mixture-of-Experts against the single-process run of the same recipe: expert parallelism
(EP = 2, 4; DP = 2 x EP), with tokens dropping and with capacity to spare, ZeRO 1/2/3 x EP,
pipelining, activation checkpointing, dropless routing, bias balancing, and checkpoints
written at one EP and continued at another. Real processes on gloo, fp32.

The routing rules themselves are in test_moe_gating.py."""

import json
import shutil

import pytest
import torch

from conftest import REPO, TINY, launch_run, losses, merge, metrics, sdtrain
from sdtrain.model import GPT, GPTConfig, count_params
from sdtrain.model.moe.layer import MoEMLP, MoESettings
from sdtrain.parallel.flat_unit import boxes
from sdtrain.recipe import RecipeError, validate_recipe
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5
STEPS = 20  # the 20 steps; checkpoints every 5, continued from the middle one
RESUME_AT = 10
# Block 1 of 2 is an MoE MLP of 4 experts, top-2; capacity factor 1 drops tokens on most steps.
MOE = {"model": {"moe": {"num_experts": 4, "top_k": 2, "every_n_layers": 2, "capacity_factor": 1.0,
                         "min_capacity": 0, "z_loss_coef": 0.001}},
       "train": {"steps": STEPS}, "checkpoint": {"at_end": True, "every": 5, "keep": 4}}
SPARE = "model.moe.capacity_factor=4.0"  # C = k x tokens / E x 4 = every token: nothing drops
SLOW = pytest.mark.slow


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, MOE), *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("moe-ref"), "single", 1)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("moe-ep2"), "ep2", 2, "parallel.expert_parallel=2")


def assert_same_run(reference, run_dir, steps=range(1, STEPS + 1)):
    expected = {m["step"]: m for m in metrics(reference) if "loss" in m}
    got = {m["step"]: m for m in metrics(run_dir) if "loss" in m}
    assert sorted(got) == list(steps)
    for step in steps:
        a, b = expected[step], got[step]
        assert abs(a["loss"] - b["loss"]) <= REL_TOL * abs(a["loss"]), f"step {step}: {a['loss']} vs {b['loss']}"
        # every expert counted once in the clipping norm, whatever holds it
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], f"step {step} grad norm"
        assert a["moe_dropped"] == b["moe_dropped"]  # the same tokens compete, so the same ones drop


def resume(tmp, source, name, nproc, *overrides):
    """`source` continued from its middle (step RESUME_AT) checkpoint with another layout."""
    resumed = tmp / name
    shutil.copytree(source, resumed)
    for later in range(RESUME_AT + 5, STEPS + 1, 5):
        shutil.rmtree(resumed / "checkpoints" / f"step_{later}")
    (resumed / "checkpoints" / "latest").write_text(f"step_{RESUME_AT}")
    (resumed / "metrics.jsonl").unlink()
    assert launch(tmp, name, nproc, *overrides, "train.resume=auto") == resumed
    return resumed


# --- default suite: one reference, EP = 2, and its checkpoint continued at EP = 1 ------------

def test_expert_parallel_matches_single_process(reference, ep2):
    assert_same_run(reference, ep2)
    record = metrics(ep2)[-1]
    assert record["moe_dropped"] > 0 and record["moe_load_max"] >= 1.0 >= record["moe_load_min"]
    assert record["moe_aux_loss"] > 0 and record["moe_z_loss"] > 0


def test_checkpoint_from_ep2_continues_at_ep1(reference, ep2, tmp_path):
    assert_same_run(reference, resume(tmp_path, ep2, "ep1", 1), steps=range(RESUME_AT + 1, STEPS + 1))
    # keyed by global expert index: the whole [E, ...] tensor, equal to the single process's
    ours, theirs = load_model_weights(ep2)[0], load_model_weights(reference)[0]
    assert ours["blocks.1.mlp.experts.w1"].shape == (4, 32, 128)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


@pytest.mark.parametrize("moe, parallel, expected", [
    ({"num_experts": 4}, {"expert_parallel": 3}, "num_experts 4 is not divisible by parallel.expert_parallel 3"),
    ({"num_experts": 2, "top_k": 3}, {}, "top_k 3 exceeds num_experts 2"),
    ({"num_experts": 2, "capacity_factor": 0.0}, {}, "capacity_factor: Input should be greater than 0"),
    ({"num_experts": 2, "every_n_layers": 0}, {}, "every_n_layers: Input should be greater than or equal to 1"),
    ({"num_experts": 2, "every_n_layers": 3}, {}, "every_n_layers 3 exceeds n_layers 2"),
    ({}, {"expert_parallel": 2}, "without experts"),
    ({"num_experts": 2}, {"pipeline": {"stages": 2, "schedule": "zero_bubble"}}, "experts' batched weights"),
])
def test_bad_moe_settings_are_refused(moe, parallel, expected):
    with pytest.raises(RecipeError, match=expected.replace("(", r"\(")):
        validate_recipe(merge(TINY, {"model": {"moe": moe}, "parallel": parallel}))


def test_expert_parallel_not_dividing_data_parallel_exits_2(write_recipe, tmp_path):
    recipe = write_recipe({"model": {"moe": {"num_experts": 4}}, "parallel": {"expert_parallel": 4}})
    result = sdtrain("launch", recipe, "--nproc-per-node", "2", "--dry-run", "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    assert "expert_parallel 4 does not divide the data-parallel size 2" in result.stderr
    assert not (tmp_path / "run").exists()


# --- in-process: the layer's index dispatch against a loop over experts ------------------------

def test_layer_equals_a_loop_over_experts():
    torch.manual_seed(0)
    settings = MoESettings(num_experts=4, top_k=2, capacity_factor=0.75, min_capacity=0, aux_loss_coef=0.0)
    layer = MoEMLP(8, 16, settings)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 12, 8)
    from sdtrain.model.moe.gating import route

    r = route(layer.router(x.reshape(-1, 8)), 2, 0.75, 0, True)
    expected = torch.zeros(24, 8)
    for t in range(24):
        for j in range(2):
            if r.kept[t, j]:
                e = r.expert[t, j]
                h = torch.nn.functional.gelu(x.reshape(-1, 8)[t] @ layer.experts.w1[e]) @ layer.experts.w2[e]
                expected[t] += r.weight[t, j] * h
    assert r.dropped > 0
    torch.testing.assert_close(layer(x).reshape(-1, 8), expected, rtol=1e-5, atol=1e-6)


def test_parameter_counts_total_and_active():
    moe = dict(MOE["model"]["moe"], num_experts=4, every_n_layers=1)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2, seq_len=32, moe=moe)
    assert GPT(cfg).num_params() == count_params(cfg)
    # active: the router and top_k = 2 of the 4 experts' 2 x 32 x 128 weights, in each of 2 blocks
    assert count_params(cfg) - count_params(cfg, active=True) == 2 * 2 * 2 * 32 * 128


def test_boxes_of_a_3d_expert_shard():
    # a flat range of a [3, 2, 4] tensor: a partial row, a whole expert, a row, a partial row
    assert boxes((3, 2, 4), 5, 22) == [((0, 1, 1), (1, 1, 3), 0), ((1, 0, 0), (1, 2, 4), 3),
                                       ((2, 0, 0), (1, 1, 4), 11), ((2, 1, 0), (1, 1, 2), 15)]


# --- slow: the rest of the matrix (`make test-slow`) ---------------------------------------------

@SLOW
@pytest.mark.parametrize("nproc, overrides", [
    (4, ["parallel.expert_parallel=4"]),
    (4, ["parallel.expert_parallel=2"]),  # DP = 2 x EP: experts averaged over their edp pair
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=1"]),
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=2"]),
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=3"]),
    (4, ["parallel.expert_parallel=2", "parallel.zero_stage=3"]),
    # everything else whole on every rank; the experts still sharded over their own group
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=3", "parallel.zero.persistence_threshold=1000000"]),
    (2, ["parallel.expert_parallel=2", "train.activation_checkpointing=true"]),
    (4, ["parallel.expert_parallel=2", "parallel.pipeline.stages=2", "parallel.zero_stage=1"]),
])
def test_expert_parallel_matrix_with_drops(reference, tmp_path, nproc, overrides):
    assert_same_run(reference, launch(tmp_path, "run", nproc, *overrides))


@SLOW
@pytest.mark.parametrize("nproc, overrides", [
    (2, ["parallel.expert_parallel=2"]),
    (4, ["parallel.expert_parallel=4"]),
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=1"]),
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=2"]),
    (2, ["parallel.expert_parallel=2", "parallel.zero_stage=3"]),
])
def test_expert_parallel_matrix_nothing_dropped(tmp_path, nproc, overrides):
    single = launch(tmp_path, "single", 1, SPARE)
    assert metrics(single)[-1]["moe_dropped"] == 0
    assert_same_run(single, launch(tmp_path, "run", nproc, SPARE, *overrides))


@SLOW
@pytest.mark.parametrize("setting", ["model.moe.drop_tokens=false", "model.moe.balance=bias"])
def test_dropless_and_bias_balance_under_expert_parallelism(tmp_path, setting):
    """Dropless: every rank its own capacity, uneven all-to-all splits. Bias: the selection
    bias moves with the load summed over all ranks, the same everywhere."""
    single = launch(tmp_path, "single", 1, setting)
    assert_same_run(single, launch(tmp_path, "ep2z3", 2, setting, "parallel.expert_parallel=2", "parallel.zero_stage=3"))


@SLOW
@pytest.mark.parametrize("nproc, overrides", [
    (4, ["parallel.expert_parallel=4"]),
    (4, ["parallel.expert_parallel=4", "parallel.zero_stage=3"]),
    (2, ["parallel.zero_stage=2"]),
])
def test_checkpoint_from_ep2_continues_in_other_layouts(reference, ep2, tmp_path, nproc, overrides):
    assert_same_run(reference, resume(tmp_path, ep2, "resumed", nproc, *overrides), steps=range(RESUME_AT + 1, STEPS + 1))


@SLOW
def test_checkpoint_from_zero3_ep2_continues_at_ep1(reference, tmp_path):
    z3 = launch(tmp_path, "z3ep2", 2, "parallel.expert_parallel=2", "parallel.zero_stage=3")
    assert_same_run(reference, resume(tmp_path, z3, "ep1", 1), steps=range(RESUME_AT + 1, STEPS + 1))
    out = tmp_path / "model.safetensors"
    result = sdtrain("export", z3, out)
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    assert load_file(out)["blocks.1.mlp.experts.w2"].shape == (4, 128, 32)  # every expert


@SLOW
def test_bf16_expert_parallel_tracks_the_single_process(tmp_path):
    single = losses(launch(tmp_path, "single", 1, "train.precision=bf16"))
    got = losses(launch(tmp_path, "ep2z2", 2, "train.precision=bf16", "parallel.expert_parallel=2",
                        "parallel.zero_stage=2"))
    for a, b in zip(single, got):
        assert abs(a - b) <= 0.02 * a
    assert got[-1] < got[0] - 0.3


@SLOW
def test_compiled_expert_parallel_matches_the_single_process(reference, tmp_path):
    """torch.compile around the MoE blocks: the grouped GEMM's traced form takes bf16 only, so
    fp32 experts run the split loop under compile; the data-dependent routing breaks the graph."""
    assert_same_run(reference, launch(tmp_path, "compiled", 2, "parallel.expert_parallel=2", "train.compile=true"))


def test_bf16_grouped_experts_in_process():
    """bf16 experts take torch's grouped GEMM (the path a GPU takes) and agree with fp32's."""
    torch.manual_seed(0)
    layer = MoEMLP(32, 64, MoESettings(num_experts=4, top_k=2, capacity_factor=2.0, min_capacity=0))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)  # the residual stream stays fp32 under autocast; the experts run in bf16
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), layer(x), rtol=0.05, atol=0.05)


def test_dry_run_shows_total_and_active_parameters(tmp_path):
    result = sdtrain("launch", REPO / "recipes" / "moe.yaml", "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    cfg = GPTConfig(**{k: v for k, v in plan["recipe"]["model"].items()})
    assert plan["params"] == {"total": count_params(cfg), "active": count_params(cfg, active=True)}
    assert plan["params"]["active"] < plan["params"]["total"] and plan["parallel"]["ep"] == 2
    estimate = sdtrain("estimate", REPO / "recipes" / "moe.yaml", "--gpus", "2", "--json")
    assert estimate.returncode == 0, estimate.stderr
    assert json.loads(estimate.stdout)["active_params"] == plan["params"]["active"]
