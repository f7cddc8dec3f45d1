"""DeepSpeed's launcher flags, typed from habit, mean the same to `sdtrain launch` (the table
in the README's "Coming from DeepSpeed")."""

import json

from conftest import sdtrain


def test_deepspeed_spellings_in_one_dry_run(write_recipe, tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n127.0.0.3 slots=2\n")
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hostfile",
                     "--num_nodes", 2, "--num_gpus", 1, "--master_addr", "127.0.0.1", "--master_port", 29517,
                     "--launcher", "openmpi", "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["launcher"] == "mpirun"  # DeepSpeed's "openmpi"
    assert [(n["host"], n["slots"]) for n in plan["nodes"]] == [("127.0.0.1", [0]), ("127.0.0.2", [0])]
    assert (plan["master_addr"], plan["master_port"]) == ("127.0.0.1", 29517)
    assert plan["nodes"][1]["command"][0] == "mpirun"


def test_include_and_deepspeed_runners_sdtrain_lacks(write_recipe, tmp_path):
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    result = sdtrain("launch", write_recipe(), "-H", tmp_path / "hostfile", "-i", "127.0.0.2:1", "--launcher", "pdsh",
                     "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert [(n["host"], n["slots"]) for n in json.loads(result.stdout)["nodes"]] == [("127.0.0.2", [1])]
    result = sdtrain("launch", write_recipe(), "--launcher", "mvapich", "--dry-run")
    assert result.returncode == 2 and "DeepSpeed runner sdtrain lacks" in result.stderr.replace("\n", " ")
