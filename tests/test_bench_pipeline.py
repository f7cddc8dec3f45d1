"""`sdtrain bench` with pipeline strategies (`pp<P>-<schedule>[-zero<S>]`): a real run whose row
carries the measured bubble beside its formula, the micro-batches it picks, bad names refused
before anything runs, the DeepSpeed pipeline peer where DeepSpeed is installed, and the plot."""

import importlib.util
import json

import pytest

from conftest import sdtrain
from sdtrain.bench.pipeline_strategy import parse_pipeline_strategy
from sdtrain.errors import UserInputError

DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_pipeline_strategy_names_and_micro_batches():
    pipeline = parse_pipeline_strategy("pp2-interleaved-zero1")
    assert (pipeline.stages, pipeline.schedule, pipeline.virtual_stages, pipeline.zero_stage) == (2, "interleaved", 2, 1)
    assert parse_pipeline_strategy("zero3") is None
    # M: the smallest multiple of P, at least 2P, dividing each replica's share of the global batch
    one_f_one_b = parse_pipeline_strategy("pp2-1f1b")
    assert one_f_one_b.micro_batches(8, world=2) == 4  # 1 replica of 8 samples: 4 x 2
    assert one_f_one_b.micro_batches(8, world=4) == 4  # 2 replicas of 4: 4 x 1
    assert one_f_one_b.micro_batches(12, world=2) == 4 and one_f_one_b.micro_batches(6, world=2) == 6
    assert parse_pipeline_strategy("pp4-gpipe").micro_batches(8, world=4) == 8
    assert parse_pipeline_strategy("pp4-gpipe").overrides(8, world=4)[-3:] == [
        "train.global_batch_size=8", "train.grad_accum_steps=8", "train.micro_batch_size=1"]
    with pytest.raises(UserInputError, match="train.global_batch_size=4"):
        one_f_one_b.micro_batches(2, world=2)  # 2 samples cannot make 4 micro-batches
    for bad in ("pp2-foo", "pp1-1f1b", "pp2-1f1b-zero4"):
        with pytest.raises(UserInputError):
            parse_pipeline_strategy(bad)


def test_bench_pipeline_bad_input_exits_2(write_recipe):
    recipe = write_recipe()
    for strategies, nproc, reason in (("pp2-foo", "2", "pp<P>-<schedule>"), ("pp4-1f1b", "2", "divide"),
                                      ("pp2-interleaved", "2", "chunks")):  # 2 layers: no 2 x 2 chunks
        result = sdtrain("bench", recipe, "--strategies", strategies, "--nproc", nproc, "--steps", 15)
        assert result.returncode == 2 and reason in " ".join(result.stderr.split()), result.stderr
    result = sdtrain("bench", write_recipe({"train": {"global_batch_size": 2, "micro_batch_size": 1}}, "small.yaml"),
                     "--strategies", "pp2-1f1b", "--steps", 15)
    assert result.returncode == 2 and "train.global_batch_size=4" in result.stderr


@pytest.mark.slow  # keeps make test near 15 minutes
def test_bench_pipeline_row_has_bubble_and_formula(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--strategies", "pp2-1f1b,ddp", "--steps", 15, "--repeats", 1,
                     "--json", out, "--plot", tmp_path / "bench.png", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    row, ddp = json.loads(out.read_text())["results"]
    assert (row["name"], row["world_size"], row["pipeline_stages"], row["schedule"]) == ("pp2-1f1b", 2, 2, "1f1b")
    # global 8 on 1 replica: M = 2P = 4 micro-batches of 2, whose 1F1B bubble is (P-1)/(M+P-1)
    assert row["micro_batches"] == 4 and row["bubble_formula"] == 0.2
    # measured from the schedule's timeline; on a tiny model overheads make it larger than the
    # formula (tests/test_pipeline.py checks the measurement itself), so only its range here
    assert 0.0 < row["bubble"] < 1.0 and len(row["bubble_per_stage"]) == 2 and row["bubble_rounds"] == [row["bubble"]]
    assert 0.0 <= row["bubble_replayed"] <= row["bubble"] + 0.02
    assert row["tokens_per_s"] > 0 and len(row["peak_mem_gib"]) == 2
    # beside DDP on the same 2 workers (which runs without a pipeline and has no bubble)
    assert ddp["name"] == "ddp" and ddp["pipeline_stages"] == 1 and "bubble" not in ddp
    assert row["vs_ddp"] == pytest.approx(row["tokens_per_s"] / ddp["tokens_per_s"], abs=2e-3)
    table = result.stdout
    assert "bubble" in table and "replayed" in table and "formula" in table and "0.200" in table and f"{row['bubble']:.3f}" in table
    assert "M = 4 micro-batches of 2" in " ".join(table.split())
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


# About 15 s on 2 cores once DeepSpeed has built its shared-memory comm op (its first use on a
# machine builds it: 30-50 s more, once).
@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed)")
def test_bench_deepspeed_pipe_peer(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    recipe = write_recipe({"model": {"n_layers": 4}})
    result = sdtrain("bench", recipe, "--strategies", "pp2-1f1b", "--peers", "deepspeed-pipe", "--steps", 15,
                     "--repeats", 1, "--json", out, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"pp2-1f1b", "deepspeed-pipe-pp2"}, json.loads(out.read_text())["notes"]
    peer = rows["deepspeed-pipe-pp2"]
    assert peer["kind"] == "peer" and peer["tokens_per_s"] > 0 and len(peer["peak_mem_gib"]) == 2
    assert (peer["pipeline_stages"], peer["micro_batches"], peer["bubble_formula"]) == (2, 4, 0.2)
    assert 0.1 < rows["pp2-1f1b"]["vs_deepspeed-pipe-pp2"] < 10  # one round on a shared machine: a ratio


def test_bench_figure_puts_the_pipeline_peer_beside_its_pipelines():
    pytest.importorskip("matplotlib")
    from sdtrain.plot.bench import bench_figure

    def row(name, kind, world, stages, tokens):
        return {"name": name, "kind": kind, "world_size": world, "zero_stage": 0, "pipeline_stages": stages,
                "tokens_per_s": tokens, "peak_mem_gib": [0.5] * world}

    results = {"recipe": "bench-20m", "precision": "fp32", "steps": 15, "repeats": 2, "notes": [], "results": [
        row("pp2-1f1b", "sdtrain", 2, 2, 900.0), row("zero0", "sdtrain", 2, 1, 1000.0),
        row("pp4-1f1b", "sdtrain", 4, 4, 500.0), row("deepspeed-pipe-pp2", "peer", 2, 2, 800.0),
        row("deepspeed-pipe-pp4", "peer", 4, 4, 450.0), row("deepspeed-z0", "peer", 2, 1, 950.0)]}
    top, _ = bench_figure(results).axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["pp2-1f1b\n2 ranks", "zero0\n2 ranks", "pp4-1f1b\n4 ranks"]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["sdtrain", "deepspeed-pipe", "deepspeed"]
    # each pipeline with the DeepSpeed pipeline of its depth, DDP with DeepSpeed ZeRO-0
    assert [bar.get_height() for bar in top.patches] == [900.0, 800.0, 1000.0, 950.0, 500.0, 450.0]
