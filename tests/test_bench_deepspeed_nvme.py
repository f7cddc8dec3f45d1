"""`sdtrain bench --peers deepspeed-nvme` (issue 22): DeepSpeed's own NVMe offload beside the
zero3-nvme rows. Which rows get a peer, which ratio a row shows, DeepSpeed's config, and a
peer that cannot run here saying why run without DeepSpeed; the bench itself runs where
DeepSpeed is importable and its async_io op builds (slow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import sdtrain
from sdtrain.bench.entry import Entry, measure
from sdtrain.bench.offload_peer import PARAMS_ON_CPU, nvme_peers, peer_rows
from sdtrain.bench.offload_strategy import parse_offload_strategy
from sdtrain.bench.rows import report
from sdtrain.recipe import validate_recipe

DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ASYNC_IO = """
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("AsyncIOBuilder")
raise SystemExit(0 if builder is not None and builder.is_compatible(verbose=False) else 1)
"""


def _offloads(*names):
    return [parse_offload_strategy(name) for name in names]


def test_a_peer_per_zero3_nvme_row_and_a_note_for_the_rest():
    notes = []
    offloads = [None, *_offloads("zero3-nvme", "zero3-nvme-params", "zero1-nvme", "zero3-cpu", "zero3-nvme")]
    rows = peer_rows(offloads, notes, on_cuda=True)
    assert [(name, option, o.name) for name, option, o in rows] == [
        ("deepspeed-nvme-z3", "optimizer", "zero3-nvme"), ("deepspeed-nvme-z3-params", "params", "zero3-nvme-params")]
    assert notes == ["deepspeed-nvme: no peer for zero1-nvme: DeepSpeed offloads to NVMe at ZeRO-3 only (at stage 1 "
                     "it treats nvme as cpu)"]


def test_on_cpu_the_params_row_has_no_peer_and_says_why():
    notes = []
    rows = peer_rows(_offloads("zero3-nvme", "zero3-nvme-params"), notes, on_cuda=False)
    assert [name for name, _, _ in rows] == ["deepspeed-nvme-z3"]
    assert notes == [f"deepspeed-nvme: no peer for zero3-nvme-params: {PARAMS_ON_CPU}"]


def test_no_nvme_row_no_peer_says_so_once():
    notes = []
    assert peer_rows(_offloads("zero3-cpu"), notes, True) == [] and peer_rows([None], notes, True) == []
    assert notes == ["deepspeed-nvme: no zero3-nvme or zero3-nvme-params strategy to compare with, skipped"]


def test_not_asked_no_peer():
    notes = []
    assert nvme_peers(["deepspeed"], _offloads("zero3-nvme"), notes, recipe=None) == [] and notes == []


@pytest.mark.skipif(DEEPSPEED, reason="deepspeed is installed here")
def test_without_deepspeed_the_peer_is_a_note():
    notes = []
    assert nvme_peers(["deepspeed-nvme"], _offloads("zero3-nvme"), notes, recipe=None) == []
    assert notes and "deepspeed not installed" in notes[0] and "libaio" in notes[0]


def _entry(name, kind, offload=None, samples=(100.0,), stage=3):
    entry = Entry(name, 2, kind, stage, [], offload=parse_offload_strategy(offload) if offload else None)
    entry.samples, entry.peak_mem_gib = list(samples), [1.0, 1.0]
    return entry


def test_an_offload_peer_is_compared_with_its_own_offload_row_only():
    recipe = validate_recipe({"name": "r", "model": {"n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 16}})
    entries = [_entry("zero3", "sdtrain", samples=(300.0,)), _entry("zero3-nvme", "sdtrain", "zero3-nvme"),
               _entry("deepspeed-z3", "peer", samples=(250.0,)),
               _entry("deepspeed-nvme-z3", "peer", "zero3-nvme", samples=(50.0,))]
    entries[3].offload_rounds = [{"offload_wait_s": 0.5, "offload_read_gib": 0.16, "offload_write_gib": 0.16}]
    rows = {r["name"]: r for r in report(entries, recipe, 15, 1, [], {"flops": None}, {2: 1000})["results"]}
    assert "vs_deepspeed-nvme-z3" not in rows["zero3"]  # in memory against offload is no framework ratio
    assert rows["zero3-nvme"]["vs_deepspeed-nvme-z3"] == 2.0 and rows["zero3-nvme"]["paired_ratios"] == [2.0]
    assert rows["zero3-nvme"]["vs_zero3"] == pytest.approx(0.333, abs=1e-3)
    peer = rows["deepspeed-nvme-z3"]
    assert (peer["offload_optimizer"], peer["offload_wait_s"], peer["offload_read_gib"]) == ("nvme", 0.5, 0.16)


def _peer_writing(result: dict) -> list[str]:
    """A real peer process that leaves `result` as its JSON, as every peer does at its end."""
    return [sys.executable, "-c", f"import sys; open(sys.argv[1], 'w').write({json.dumps(result)!r})", "{out}"]


def test_a_peer_that_cannot_run_here_is_skipped_with_its_reason(tmp_path):
    entry = Entry("deepspeed-nvme-z3-params", 2, "peer", 3, _peer_writing({"skipped": "no async_io op here"}),
                  offload=parse_offload_strategy("zero3-nvme-params"))
    assert measure(entry, tmp_path / "out", []) == "skipped: no async_io op here"
    assert entry.samples == [] and entry.offload_rounds == []


def test_a_peers_own_io_numbers_are_its_offload_round(tmp_path):
    result = {"tokens_per_s": [10.0, 200.0, 300.0], "peak_mem_gib": [1.0, 1.1], "offload_wait_s": 0.25,
              "offload_read_gib": 0.5, "offload_write_gib": 0.5}
    entry = Entry("deepspeed-nvme-z3", 2, "peer", 3, _peer_writing(result),
                  offload=parse_offload_strategy("zero3-nvme"))
    assert measure(entry, tmp_path / "out", []) is None
    assert entry.samples == [250.0]  # after the warm-up interval
    assert entry.offload_rounds == [{"offload_wait_s": 0.25, "offload_read_gib": 0.5, "offload_write_gib": 0.5}]


def test_deepspeed_config_puts_the_optimizer_and_with_params_the_weights_on_nvme(tmp_path):
    from sdtrain.bench.peer_common import build_model
    from sdtrain.bench.peer_deepspeed_nvme import PERSISTENCE_THRESHOLD, nvme_config

    recipe = validate_recipe({"name": "r", "model": {"n_layers": 2, "d_model": 256, "n_heads": 2, "seq_len": 16}})
    optimizer_only = nvme_config(str(tmp_path))
    assert optimizer_only["stage"] == 3 and "offload_param" not in optimizer_only
    assert optimizer_only["offload_optimizer"] == {"device": "nvme", "nvme_path": str(tmp_path), "pin_memory": False,
                                                   "buffer_count": 4}
    import torch

    model = build_model(recipe.model_dump(mode="json"), torch.device("cpu"))
    params = nvme_config(str(tmp_path), model)["offload_param"]
    swapped = [p for p in model.blocks["0"].parameters() if p.numel() > PERSISTENCE_THRESHOLD]
    assert swapped and params["buffer_count"] == 2 * len(swapped) + 4
    assert params["buffer_size"] == max(p.numel() for p in model.parameters()) and params["device"] == "nvme"


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED, reason="deepspeed not installed (DS_BUILD_OPS=0 pip install deepspeed)")
def test_bench_deepspeed_nvme_peer_beside_zero3_nvme(write_recipe, tmp_path):
    if subprocess.run([sys.executable, "-c", ASYNC_IO]).returncode != 0:
        pytest.skip("DeepSpeed's async_io op does not build here (libaio)")
    out = tmp_path / "bench.json"
    # DeepSpeed keeps a sub-group under its aio block (1 MiB here) in memory: a model whose shard is more
    recipe = write_recipe({"model": {"d_model": 256, "n_heads": 4}})
    result = sdtrain("bench", recipe, "--strategies", "zero3-nvme", "--peers", "deepspeed-nvme",
                     "--steps", 15, "--repeats", 1, "--json", out, timeout=1200)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    rows = {r["name"]: r for r in results["results"]}
    assert set(rows) == {"zero3-nvme", "deepspeed-nvme-z3"}, results["notes"]
    peer = rows["deepspeed-nvme-z3"]
    assert peer["tokens_per_s"] > 0 and peer["offload_wait_s"] > 0  # time in DeepSpeed's swap calls
    assert peer["offload_write_gib"] > 0 and peer["offload_read_gib"] >= 0  # a tiny model's reads may miss the disk
    assert 0.05 < rows["zero3-nvme"]["vs_deepspeed-nvme-z3"] < 20  # one round on a shared machine: a ratio
