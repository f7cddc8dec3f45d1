"""`sdtrain plan` from the command line: the table, --json, --explain, --write, a cluster given
by flags or a file or measured here, and bad input refused with exit 2."""

import json

import pytest
import yaml

from conftest import REPO, sdtrain
from sdtrain.plan.rank import JSON_KEYS
from sdtrain.recipe import load_recipe

BENCH = REPO / "recipes" / "bench-20m.yaml"
CLUSTER = ("--gpus", 4, "--gpus-per-node", 4, "--device-memory-gib", 2, "--peak-tflops", 0.2,
           "--intra-node-gbps", 2, "--inter-node-gbps", 1)


def plan(*args, **kw):
    return sdtrain("plan", *args, **kw)


def test_json_lists_every_layout_with_the_contract_keys():
    out = plan(BENCH, *CLUSTER, "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) > 300 and all(tuple(row) == JSON_KEYS for row in rows)
    fitting = [r for r in rows if r["fits"]]
    assert fitting and rows[: len(fitting)] == fitting  # fitting first, fastest first
    speeds = [r["predicted_tokens_per_s"] for r in fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert all(r["reason"] == "" for r in fitting)
    assert all(r["reason"] and r["predicted_step_s"] is None for r in rows if r["predicted_mem_gib"] is None)
    top = json.loads(plan(BENCH, *CLUSTER, "--json", "--top", 3).stdout)
    assert top == rows[:3]


def test_a_cluster_file_is_the_flags():
    flags = json.loads(plan(BENCH, *CLUSTER, "--json", "--top", 5).stdout)
    cluster = REPO / "tests" / "data" / "plan-cluster.yaml"
    assert yaml.safe_load(cluster.read_text())["gpus"] == 4
    from_file = plan(BENCH, "--cluster", cluster, "--json", "--top", 5)
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout) == flags


def test_table_and_explain_print_each_term():
    out = plan(BENCH, *CLUSTER, "--top", 3)
    assert out.returncode == 0, out.stderr
    assert "layouts in" in out.stdout and "fit with a 10% margin" in out.stdout
    out = plan(BENCH, *CLUSTER, "--explain", "pp2-tp1-dp2-z3-mb1-ac0")
    assert out.returncode == 0, out.stderr
    for term in ("compute", "pp p2p", "pipeline bubble", "zero-3 gathers", "optimizer step", "memory per rank",
                 "weights", "activations"):
        assert term in out.stdout, term
    out = plan(BENCH, *CLUSTER, "--explain", "pp2-tp1-dp2-z3-mb4-ac0")  # M = 1 < P: cannot run, says why
    assert out.returncode == 0 and "cannot run" in out.stdout and "micro-batches" in out.stdout


def test_write_gives_a_recipe_that_launches_as_is(tmp_path):
    out_file = tmp_path / "planned.yaml"
    cluster = ("--gpus", 2, "--gpus-per-node", 2, "--device-memory-gib", 2, "--peak-tflops", 0.2,
               "--intra-node-gbps", 2, "--inter-node-gbps", 1)
    out = plan(BENCH, *cluster, "--write", out_file, "--explain", "pp2-tp1-dp1-z1-nvme-mb2-ac1-gpipe")
    assert out.returncode == 0, out.stderr
    written = yaml.safe_load(out_file.read_text())
    assert written["parallel"]["pipeline"] == {**written["parallel"]["pipeline"], "stages": 2, "schedule": "gpipe"}
    assert written["parallel"]["zero_stage"] == 1 and written["train"]["micro_batch_size"] == 2
    assert written["parallel"]["zero"]["offload_optimizer"] == "nvme"
    assert written["train"]["activation_checkpointing"] is True
    dry = sdtrain("launch", out_file, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert dry.returncode == 0, dry.stderr
    launched = json.loads(dry.stdout)
    assert launched["world_size"] == 2 and launched["batch"]["micro"] == 2 and launched["batch"]["grad_accum"] == 4
    assert plan(BENCH, *cluster, "--write", out_file).returncode == 2  # exists: --force to overwrite
    refused = plan(BENCH, *cluster, "--write", tmp_path / "z1.yaml", "--explain", "pp2-tp1-dp1-z1-mb2-ac1-gpipe")
    assert refused.returncode == 2 and "shards over dp, which is 1" in " ".join(refused.stderr.split())
    assert not (tmp_path / "z1.yaml").exists()  # ZeRO at dp 1 without offload: refused, nothing written
    assert plan(BENCH, *cluster, "--write", out_file, "--force").returncode == 0


@pytest.mark.parametrize("args, words", [
    (("--gpus", 4), "missing --gpus-per-node"),
    ((*CLUSTER, "--cluster", "x.yaml"), "one way"),
    ((*CLUSTER, "--explain", "tp2-pp1"), "not a layout name"),
    ((*CLUSTER, "--explain", "pp1-tp1-dp8-z0-mb1-ac0"), "no such layout of 4 ranks"),
    ((*CLUSTER, "--explain", "pp1-tp1-dp4-z0-mb3-ac0"), "not a multiple of micro-batch 3"),
    ((*CLUSTER[:-1], 0), "must be above 0"),
    (("--gpus", 6, "--gpus-per-node", 4, *CLUSTER[4:]), "whole nodes"),
    ((*CLUSTER, "--verify", 1), "plan for it"),
    ((*CLUSTER, "--verify", 1, "--verify-rounds", 0), "--verify-rounds"),
])
def test_bad_input_exits_2_with_the_fix(args, words):
    out = plan(BENCH, *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert words in " ".join(out.stderr.split()), out.stderr


def test_a_bad_cluster_file_exits_2(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("gpus: 4\ngpus_per_nod: 4\n")
    out = plan(BENCH, "--cluster", bad)
    assert out.returncode == 2 and "unknown key 'gpus_per_nod'" in out.stderr


def test_measured_here_is_cached_with_the_date_and_the_command_to_refresh(tmp_path):
    env = {"SDTRAIN_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = plan(BENCH, "--nproc-per-node", 1, "--json", "--top", 1, env=env)
    assert out.returncode == 0, out.stderr
    files = sorted(p.name for p in (tmp_path / "plan").iterdir())
    assert [f.split("-")[0] for f in files] == ["efficiency", "machine", "page"]
    machine = json.loads(next((tmp_path / "plan").glob("machine-*.json")).read_text())
    assert machine["measured_at"] and "--remeasure" in machine["refresh"] and machine["peak_tflops"] > 0
    page_cache = json.loads(next((tmp_path / "plan").glob("page-cache-*.json")).read_text())  # CPU offload's price
    assert page_cache["measured_at"] and page_cache["read_gbps"] > 0 and page_cache["write_gbps"] > 0
    again = plan(BENCH, "--nproc-per-node", 1, "--json", "--top", 1, env=env)
    assert json.loads(again.stdout)[0]["predicted_step_s"] == json.loads(out.stdout)[0]["predicted_step_s"]


def test_the_tp_probe_times_a_real_tp_pair():
    """Two processes run the two-block model cut over tp 2 (sequence parallel) as a run cuts it."""
    from sdtrain.plan.tp_probe import tp_overhead

    fields = load_recipe(BENCH, [], layout_checked_at_launch=True).model.model_dump()
    fields.update(n_layers=2, init_from=None)
    overhead = tp_overhead(fields, 1024, 2, 2, True, 1, one_process_s=1.0)
    assert 0 < overhead < 100
