"""The CLI contract: --dry-run (text and JSON), run-directory handling, env."""

import json

from conftest import REPO, losses, sdtrain


def test_dry_run_json_contract(write_recipe, tmp_path):
    result = sdtrain("launch", write_recipe(), "--nproc-per-node", 2, "--dry-run", "--json",
                     "--run-dir", tmp_path / "run", "--set", "train.micro_batch_size=1")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 2 and plan["master_addr"] == "127.0.0.1"
    assert isinstance(plan["master_port"], int)
    assert plan["batch"] == {"global": 8, "micro": 1, "grad_accum": 4, "data_parallel": 2}
    (node,) = plan["nodes"]
    assert node["host"] == "localhost" and node["slots"] == [0, 1] and node["node_rank"] == 0
    assert node["command"][1:3] == ["-m", "sdtrain.launch.node"]
    assert "--nproc" in node["command"] and node["command"][node["command"].index("--nproc") + 1] == "2"
    assert [p["rank"] for p in plan["placement"]] == [0, 1]
    assert plan["recipe"]["train"]["grad_accum_steps"] == 4
    assert not (tmp_path / "run").exists()  # a dry run launches and writes nothing


def test_dry_run_text_shows_batch_placement_and_commands(write_recipe, tmp_path):
    result = sdtrain("launch", write_recipe(), "--nproc-per-node", 2, "--dry-run", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "global_batch_size 8 = micro_batch_size 2 x grad_accum_steps 2 x data_parallel 2" in out
    assert "placement: world size 2" in out and "pipeline stage" in out
    assert "-m sdtrain.launch.node" in out
    assert "n_layers: 2" in out  # the resolved recipe


def test_fresh_run_moves_an_earlier_one_aside(write_recipe, tmp_path):
    recipe = write_recipe({"train": {"steps": 2}})
    run_dir = tmp_path / "run"
    assert sdtrain("launch", recipe, "--run-dir", run_dir).returncode == 0
    first = losses(run_dir)
    result = sdtrain("launch", recipe, "--run-dir", run_dir)
    assert result.returncode == 0 and "held an earlier run: moved it to" in result.stdout
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.")]
    assert losses(aside) == first == losses(run_dir)  # nothing lost, and the same seed: the same run


def test_default_run_dir_is_runs_slash_name(write_recipe, tmp_path):
    result = sdtrain("launch", write_recipe({"name": "named", "train": {"steps": 2}}), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "named" / "metrics.jsonl").is_file()
    assert (tmp_path / "runs" / "named" / "recipe.yaml").read_text().startswith("name: named")


def test_env_reports_versions():
    result = sdtrain("env")
    assert result.returncode == 0
    assert "torch" in result.stdout and "gloo" in result.stdout and "available" in result.stdout


def test_help_lists_commands():
    result = sdtrain("--help")
    assert result.returncode == 0
    for command in ("launch", "bench", "env", "export"):
        assert command in result.stdout
    assert (REPO / "recipes" / "quickstart.yaml").is_file()


def test_every_shipped_recipe_validates(tmp_path):
    # The GPT-2 recipes are sized for GPUs: on a CPU machine the memory check refuses them
    # (tests/test_memory_plan.py); here only whether they validate counts.
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        result = sdtrain("launch", recipe, "--dry-run", "--json", "--nproc-per-node", 2, "--run-dir", tmp_path / recipe.stem,
                         "--set", "launch.memory_check=warn")
        assert result.returncode == 0, f"{recipe.name}: {result.stderr}"


def test_tensorboard_missing_is_bad_input(write_recipe, tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    result = sdtrain("launch", write_recipe({"log": {"tensorboard": True}}), "--run-dir", tmp_path / "run")
    assert result.returncode == 2 and "pip install 'sdtrain[tensorboard]'" in result.stderr


def test_a_large_plan_prints_its_first_and_last_ranks_and_every_command(write_recipe, tmp_path):
    """A 4,096-host plan: 64 placement rows and a line saying where the rest are, then every
    node's exact command (a table row and two prints per node took minutes at 65,536 hosts)."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"10.0.{i // 256}.{i % 256} slots=1\n" for i in range(4096)))
    result = sdtrain("launch", write_recipe({"train": {"global_batch_size": 8192}}), "--hostfile", hostfile,
                     "--dry-run", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ranks 32-4063 left out above: --dry-run --json lists every rank" in out
    assert "│ 31   │ 10.0.0.31 " in out and "│ 4064 │ 10.0.15.224 " in out and "│ 32   │" not in out
    assert sum(line.startswith("node ") for line in out.splitlines()) == 4096
    assert "--node-rank 4095 " in out
