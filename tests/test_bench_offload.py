"""`sdtrain bench` offload strategies (issue 22): the names, their recipe keys, the columns of
exposed I/O wait and achieved bandwidth ("-" where a run logged none), and the disk probe."""

from __future__ import annotations

import json
import os

import pytest

from conftest import TINY, sdtrain
from sdtrain.bench.disk import probe_disk, probe_page_cache
from sdtrain.bench.entry import Entry
from sdtrain.bench.offload_strategy import OffloadStrategy, offload_numbers, parse_offload_strategy
from sdtrain.bench.rows import report
from sdtrain.bench.table import bench_table
from sdtrain.console_table import FoldingTable
from sdtrain.errors import UserInputError
from sdtrain.recipe import validate_recipe


@pytest.mark.parametrize("name, stage, device, params", [
    ("zero1-nvme", 1, "nvme", False), ("zero2-nvme", 2, "nvme", False), ("zero3-nvme", 3, "nvme", False),
    ("zero3-nvme-params", 3, "nvme", True), ("zero1-cpu", 1, "cpu", False), ("zero3-cpu-params", 3, "cpu", True),
])
def test_names_are_the_zero_stage_with_the_offload_keys(name, stage, device, params):
    strategy = parse_offload_strategy(name)
    assert strategy == OffloadStrategy(name, stage, device, params)
    sets = dict(item.split("=") for item in strategy.overrides())
    assert sets["parallel.zero_stage"] == str(stage) and sets["parallel.zero.offload_optimizer"] == device
    assert sets["parallel.zero.offload_params"] == (device if params else "none")


@pytest.mark.parametrize("name, expected", [("zero2-nvme-params", "write zero3-nvme-params or zero2-nvme"),
                                            ("zero0-nvme", "offload goes with ZeRO stage 1, 2 or 3")])
def test_impossible_names_are_refused_with_the_fix(name, expected):
    with pytest.raises(UserInputError, match=expected):
        parse_offload_strategy(name)


def test_plain_names_are_not_offload():
    assert all(parse_offload_strategy(n) is None for n in ("zero3", "ddp", "zero3-nvm", "tp2", "pp2-1f1b"))


def test_bench_refuses_before_running(write_recipe):
    result = sdtrain("bench", write_recipe(), "--strategies", "zero1-nvme-params")
    assert result.returncode == 2 and "zero3-nvme-params" in result.stderr
    result = sdtrain("bench", write_recipe(), "--strategies", "zero1-disk")
    assert result.returncode == 2 and "offload: zero<S>-nvme|cpu[-params]" in " ".join(result.stderr.split())


def test_offload_numbers_from_metrics_and_dashes_where_absent():
    rows = [{"offload_wait_s": 0.2, "offload_read_gbps": 1.0, "offload_write_gbps": 0.5},
            {"offload_wait_s": 0.4, "offload_read_gbps": 3.0, "offload_write_gbps": 0.7},
            {"offload_wait_s": 0.3, "offload_read_gbps": 2.0, "offload_write_gbps": 0.6}]
    assert offload_numbers(rows) == pytest.approx({"offload_wait_s": 0.3, "offload_read_gbps": 2.0,
                                                   "offload_write_gbps": 0.6})
    assert offload_numbers([{"loss": 1.0}]) == dict.fromkeys(("offload_wait_s", "offload_read_gbps", "offload_write_gbps"))


def _row(name, **extra):
    return {"name": name, "kind": "sdtrain", "world_size": 2, "step_s": 0.5, "tokens_per_s": 1000.0, "mfu": None,
            "peak_mem_gib": [1.0, 1.0], "model_state_bytes": None, "comm_bytes_per_step": None, **extra}


def _text(table: FoldingTable) -> str:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(table)
    return console.export_text()


def test_table_shows_offload_columns_only_with_offload_rows():
    results = {"recipe": "r", "precision": "fp32", "steps": 15, "repeats": 1, "notes": []}
    plain = _text(bench_table({**results, "results": [_row("zero3")]}))
    assert "io wait s" not in plain
    rows = [_row("zero3"), _row("zero3-nvme", offload_optimizer="nvme", offload_wait_s=0.125,
                                offload_read_gbps=1.5, offload_write_gbps=0.75),
            _row("zero3-nvme-params", offload_optimizer="nvme", offload_wait_s=None, offload_read_gbps=None,
                 offload_write_gbps=None)]
    text = _text(bench_table({**results, "results": rows}))
    assert "io wait s" in text and "read GB/s" in text and "write GB/s" in text
    line = next(line for line in text.splitlines() if line.startswith("│ zero3-nvme "))
    assert "0.125" in line and "1.50" in line and "0.75" in line
    params = next(line for line in text.splitlines() if "zero3-nvme-params" in line)
    assert params.count(" - ") >= 3


def test_disk_probe_measures_and_leaves_nothing(tmp_path):
    found = probe_disk(tmp_path, block_bytes=4 * 2**20 + 123, total_bytes=16 * 2**20)
    assert found["block_bytes"] % os.sysconf("SC_PAGE_SIZE") == 0  # aligned, as O_DIRECT needs
    assert found["bytes"] == 4 * found["block_bytes"] and found["path"] == str(tmp_path)
    assert found["write_gbps"] > 0 and found["read_gbps"] > 0
    assert found["read_mode"] in ("O_DIRECT", "page cache dropped (posix_fadvise), buffered pread")
    assert list(tmp_path.iterdir()) == []


def test_page_cache_probe_measures_and_leaves_nothing(tmp_path):
    """What the planner prices CPU offload at (plan/measure.py): the same moves, never fsync'd."""
    found = probe_page_cache(tmp_path, block_bytes=4 * 2**20, total_bytes=16 * 2**20)
    assert found["bytes"] == 16 * 2**20 and found["block_bytes"] == 4 * 2**20 and found["path"] == str(tmp_path)
    assert found["write_gbps"] > 0 and found["read_gbps"] > 0 and "read_mode" not in found
    assert list(tmp_path.iterdir()) == []


def test_the_planner_prices_cpu_offload_by_the_probe_where_the_files_go(tmp_path, monkeypatch):
    from conftest import REPO
    from sdtrain.plan.measure import UNPROBED_DISK_GBPS, offload_gbps
    from sdtrain.recipe import load_recipe

    monkeypatch.setenv("SDTRAIN_CACHE", str(tmp_path / "cache"))

    def priced(nvme_path):
        recipe = load_recipe(REPO / "recipes" / "bench-20m.yaml", [f"parallel.zero.nvme_path={nvme_path}"])
        return offload_gbps(recipe, "refresh", remeasure=False)

    (tmp_path / "nvme").mkdir()
    assert priced(tmp_path / "nvme" / "run") > 0  # probed in the nearest folder that exists
    assert list((tmp_path / "nvme").iterdir()) == [] and len(list((tmp_path / "cache" / "plan").iterdir())) == 1
    assert priced("/proc/sdtrain-nowhere") == UNPROBED_DISK_GBPS  # nowhere to write: a slow disk, no crash


@pytest.mark.slow
def test_bench_runs_an_nvme_row_beside_its_stage_and_the_disk(write_recipe, tmp_path):
    out = tmp_path / "bench.json"
    result = sdtrain("bench", write_recipe(), "--strategies", "zero1,zero1-nvme", "--steps", 15, "--repeats", 1,
                     "--nproc", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    rows = {row["name"]: row for row in results["results"]}
    assert rows["zero1-nvme"]["offload_optimizer"] == "nvme" and "offload_wait_s" in rows["zero1-nvme"]
    assert "offload_optimizer" not in rows["zero1"]
    assert results["disk"]["write_gbps"] > 0 and "disk at" in result.stdout


def test_an_offload_row_is_compared_with_its_stage_in_memory():
    plain = Entry("zero3", 2, "sdtrain", 3, [], samples=[1000.0])
    nvme = Entry("zero3-nvme", 2, "sdtrain", 3, [], samples=[800.0], offload=parse_offload_strategy("zero3-nvme"),
                 offload_rounds=[{"offload_wait_s": 0.1, "offload_read_gbps": 2.0, "offload_write_gbps": 1.0}])
    other_stage = Entry("zero2", 2, "sdtrain", 2, [], samples=[900.0])
    recipe = validate_recipe(TINY)
    rows = {r["name"]: r for r in report([plain, nvme, other_stage], recipe, 15, 1, [], {"flops": None},
                                         {2: 1000})["results"]}
    assert rows["zero3-nvme"]["vs_zero3"] == 0.8 and "vs_zero2" not in rows["zero3-nvme"]
    assert rows["zero3-nvme"]["offload_wait_s"] == 0.1 and rows["zero3-nvme"]["offload_params"] == "none"
    assert not any(k.startswith("vs_") for k in rows["zero3"])


def test_reads_faster_than_the_disk_are_said_to_come_from_the_page_cache():
    from sdtrain.bench.disk import cached_reads

    disk = {"read_gbps": 1.3}
    rows = [_row("zero3-nvme", offload_optimizer="nvme", offload_read_gbps=7.3),
            _row("zero2-nvme", offload_optimizer="nvme", offload_read_gbps=0.9),
            _row("zero3-nvme-params", offload_optimizer="nvme", offload_read_gbps=None)]
    [note] = cached_reads(rows, disk)
    assert note.startswith("zero3-nvme (world 2) read 7.30 GB/s, above the disk's own 1.30") and "page cache" in note
