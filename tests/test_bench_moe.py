"""`sdtrain bench` with expert-parallel strategies (`ep<N>[-zero<S>]`): real MoE runs whose rows
carry the all-to-all's share of step time, bad names and layouts refused before anything runs,
and DeepSpeed's MoE layer as the peer at the same E, k, capacity and EP where it is installed."""

import importlib.util
import json

import pytest

from conftest import sdtrain
from sdtrain.bench.moe_strategy import all_to_all_share, parse_expert_strategy
from sdtrain.bench.run import run_bench
from sdtrain.errors import UserInputError

DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
MOE = {"model": {"moe": {"num_experts": 4, "top_k": 2, "every_n_layers": 2}}}


def test_expert_strategy_names_and_share():
    strategy = parse_expert_strategy("ep4-zero1")
    assert (strategy.ep, strategy.zero_stage, strategy.peer_name) == (4, 1, "deepspeed-moe-ep4-z1")
    assert "parallel.expert_parallel=4" in strategy.overrides()
    assert parse_expert_strategy("zero1") is None
    for bad in ("ep", "ep0", "ep2-zero4", "ep2-foo"):
        with pytest.raises(UserInputError):
            parse_expert_strategy(bad)
    assert all_to_all_share([{"moe_all_to_all_share": 0.1}, {"moe_all_to_all_share": 0.3}]) == pytest.approx(0.2)
    assert all_to_all_share([{"tokens_per_s": 2000.0}]) is None  # a run without the metric


def test_bench_moe_bad_input_refused_before_any_run(write_recipe):
    dense = write_recipe()
    moe = str(write_recipe(MOE, "moe.yaml"))
    for recipe, strategies, worlds, reason in ((str(dense), "ep2", [2], "model.moe"), (moe, "ep3", [3], "divisible"),
                                               (moe, "ep4", [2], "divides none"), (moe, "ep2-zero9", [2], "ep<N>")):
        with pytest.raises(UserInputError, match=reason):
            run_bench(recipe, [strategies], [], worlds, steps=15, repeats=1, overrides=[])
    result = sdtrain("bench", dense, "--strategies", "ep2", "--steps", 15)  # and the CLI exits 2 with it
    assert result.returncode == 2 and "model.moe" in result.stderr, result.stderr


# About 2 minutes on 2 cores (four real runs), so in the slow suite.
@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed)")
def test_bench_moe_rows_and_deepspeed_peer(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(MOE), "--strategies", "ep1,ep2", "--peers", "deepspeed-moe",
                     "--steps", 15, "--repeats", 1, "--json", out, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert set(rows) == {"ep1", "ep2", "deepspeed-moe-ep1", "deepspeed-moe-ep2"}, results["notes"]
    for name in ("ep2", "deepspeed-moe-ep2"):
        assert rows[name]["expert_parallel"] == 2 and 0.0 < rows[name]["all_to_all_share"] < 1.0
    assert rows["ep1"]["all_to_all_share"] in (None, 0.0)  # one rank holds every expert: no exchange
    for ep in (1, 2):
        ratio = rows[f"ep{ep}"][f"vs_deepspeed-moe-ep{ep}"]
        assert 0.1 < ratio < 10  # one round on a shared machine: a ratio, not a verdict
    assert rows["ep2"]["paired_ratios"] == [rows["ep2"]["vs_deepspeed-moe-ep2"]]  # one round: its ratio
    assert "all-to-all" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed)")
def test_layer_bench_compares_like_with_like(capsys, monkeypatch):
    """`python -m sdtrain.bench.moe_layer`: DeepSpeed's layer gets sdtrain's weights, so both
    route, drop and compute the same, output and input gradient (balancing loss included)
    alike; then both are timed."""
    import torch
    import torch.distributed as dist

    from sdtrain.bench import moe_layer
    from sdtrain.launch.plan import free_port

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)  # this process alone, as under torchrun
    moe_layer.join(deepspeed_too=True)
    try:
        args = moe_layer.parse_args(["--tokens", "96", "--d-model", "32", "--capacity-factor", "1.0"])
        torch.manual_seed(0)
        ours = moe_layer.sdtrain_layer(args)
        theirs = moe_layer.deepspeed_layer(args, ours)
        x = torch.randn(args.tokens, args.d_model, requires_grad=True)
        mine = ours(x)
        (grad_mine,) = torch.autograd.grad(mine.sum(), x)
        out, aux, _ = theirs(x)  # sdtrain's layer starts its aux loss's gradient itself
        (grad_theirs,) = torch.autograd.grad(out.sum() + ours.moe.aux_loss_coef * aux, x)
        torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_mine, grad_theirs, rtol=1e-5, atol=1e-6)
        assert ours.stats[3] > 0  # capacity factor 1: some assignments dropped, the same in both

        moe_layer.main(["--tokens", "64", "--d-model", "32", "--rounds", "2"])
    finally:
        dist.destroy_process_group()
    printed = capsys.readouterr().out
    assert "sdtrain" in printed and "deepspeed / sdtrain:" in printed


@pytest.mark.parametrize("flags, named", [
    (["--top-k", "9"], "--top-k must be between 1 and --experts (8)"),
    (["--capacity-factor", "0"], "--capacity-factor must be above 0"),
    (["--tokens", "0"], "must be at least 1"),
])
def test_layer_bench_bad_flags_exit_2_before_anything_runs(flags, named):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sdtrain.bench.moe_layer", *flags], capture_output=True, text=True)
    assert result.returncode == 2 and named in result.stderr, result.stderr


def test_layer_bench_experts_must_divide_over_the_ranks(monkeypatch, capsys):
    from sdtrain.bench import moe_layer

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node 3 sets it
    with pytest.raises(SystemExit) as exit_:
        moe_layer.parse_args(["--experts", "8"])
    assert exit_.value.code == 2 and "must divide over the 3 torchrun ranks" in capsys.readouterr().err
