"""`sdtrain bench` runs each strategy and the plain-PyTorch peer for real, and reports ratios."""

import json
from types import SimpleNamespace

import pytest

from conftest import sdtrain
from sdtrain.model.size import flops_per_token


def test_bench_strategies_and_torch_peer(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--peers", "torch", "--steps", 15, "--repeats", 1,
                     "--json", out, "--plot", tmp_path / "bench.png", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert set(rows) == {"single", "ddp", "torch-ddp"}
    assert rows["single"]["world_size"] == 1 and rows["ddp"]["world_size"] == 2
    assert len(rows["ddp"]["peak_mem_gib"]) == 2 and len(rows["torch-ddp"]["peak_mem_gib"]) == 2
    for row in rows.values():
        assert row["tokens_per_s"] > 0
    # A ratio measured side by side; on a shared 2-core machine it moves, so only a sanity
    # bound here (the closing note of each change reports the measured value).
    assert 0.5 < rows["ddp"]["vs_torch-ddp"] < 2.0
    assert "torch-ddp" in result.stdout
    # --plot: the same table as bars (tests/test_plot.py checks the figure's bars and legend).
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_input_exits_2(write_recipe):
    assert sdtrain("bench", write_recipe(), "--strategies", "zeroX").returncode == 2
    assert sdtrain("bench", write_recipe(), "--peers", "megatron").returncode == 2
    assert sdtrain("bench", write_recipe(), "--steps", 3).returncode == 2
    assert sdtrain("bench", write_recipe({"train": {"stpes": 1}})).returncode == 2


@pytest.mark.slow  # keeps make test near 15 minutes
def test_bench_single_device_eager_peer(write_recipe, tmp_path):
    # The eager peer is nanoGPT's loop on one device: compared with sdtrain's single run,
    # on the device the recipe would use (the CPU here), with every row's MFU against one peak.
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe({"train": {"peak_flops": 1e11}}), "--strategies", "single",
                     "--peers", "eager", "--steps", 15, "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert set(rows) == {"single", "torch-eager"}
    assert rows["torch-eager"]["world_size"] == 1 and rows["torch-eager"]["tokens_per_s"] > 0
    # one round of a few milliseconds a step on a shared machine: a ratio, not a bound on it
    assert 0.1 < rows["single"]["vs_torch-eager"] < 10
    assert results["peak_flops"]["source"] == "train.peak_flops" and "(measured)" in results["peak_flops"]["measured"]
    flops = flops_per_token(SimpleNamespace(**results["model"]))
    for row in rows.values():
        assert abs(row["mfu"] - flops * row["tokens_per_s"] / 1e11) <= 1e-4
    assert "torch-eager" in result.stdout
