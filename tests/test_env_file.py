"""`.sdtrain_env` applies to a local run as it does to remote nodes; the launch names the file
it read and the variables it set, and refuses the names that decide which code runs or make
the run fail on purpose unless the launch allows each by name."""

import json
import os

import pytest

from conftest import sdtrain
from sdtrain.errors import UserInputError
from sdtrain.launch.exports import exported_environment, load_env_file

ALLOW = "--allow-env-file-var"


def test_env_file_reaches_the_workers_of_a_local_run(write_recipe, tmp_path):
    assert "SDTRAIN_INJECT_FAULT" not in os.environ  # set only in the file below
    (tmp_path / ".sdtrain_env").write_text("# a drill\nexport SDTRAIN_INJECT_FAULT=0:1\n")
    recipe = write_recipe({"train": {"steps": 4}})
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", ALLOW, "SDTRAIN_INJECT_FAULT",
                     cwd=tmp_path, env={"HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert "fault injected by SDTRAIN_INJECT_FAULT=0:1" in err
    assert f"read {tmp_path / '.sdtrain_env'}: sets SDTRAIN_INJECT_FAULT" in err
    assert "fault-injection drill active" in err and f"SDTRAIN_INJECT_FAULT=0:1 (from {tmp_path / '.sdtrain_env'})" in err
    assert "exit code 1 (injected)" in err  # the root cause's title
    assert f"injected by SDTRAIN_INJECT_FAULT=0:1 (from {tmp_path / '.sdtrain_env'}): a drill, not a real failure" in err


def test_a_bad_env_file_is_bad_input_for_a_local_run_too(write_recipe, tmp_path):
    (tmp_path / ".sdtrain_env").write_text("NOT A LINE\n")
    result = sdtrain("launch", write_recipe(), "--dry-run", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and ".sdtrain_env line 1" in result.stderr


@pytest.mark.parametrize("name", ["PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH", "SDTRAIN_INJECT_NAN"])
def test_a_guarded_name_in_the_file_is_refused_unless_allowed(tmp_path, name):
    (tmp_path / ".sdtrain_env").write_text(f"NCCL_IB_HCA=mlx5\n{name}=x\n")
    with pytest.raises(UserInputError) as err:
        load_env_file(tmp_path, tmp_path)
    assert str(err.value).startswith(f"{tmp_path / '.sdtrain_env'} sets {name}:")
    assert f"--allow-env-file-var {name}" in str(err.value)
    assert load_env_file(tmp_path, tmp_path, allowed=[name]).variables == {"NCCL_IB_HCA": "mlx5", name: "x"}
    with pytest.raises(UserInputError):  # allowing one name allows no other
        load_env_file(tmp_path, tmp_path, allowed=["PYTHON"])


def test_the_launchers_own_environment_is_not_refused(tmp_path):
    """The user's shell is the user's: only the file, which is found rather than named, is guarded."""
    env = exported_environment({"PYTHONPATH": "/src", "SDTRAIN_INJECT_FAULT": "0:1"}, tmp_path, tmp_path)
    assert env == {"PYTHONPATH": "/src", "SDTRAIN_INJECT_FAULT": "0:1"}


def test_refusal_is_exit_2_before_anything_launches(write_recipe, tmp_path):
    """Reproduction: a checkout carrying `.sdtrain_env` with LD_PRELOAD and a forgotten drill
    used to reach every worker silently."""
    (tmp_path / ".sdtrain_env").write_text("LD_PRELOAD=/tmp/hook.so\nSDTRAIN_INJECT_NAN=0:1\n")
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write_recipe(), "--run-dir", run_dir, cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert f"{tmp_path / '.sdtrain_env'} sets LD_PRELOAD, SDTRAIN_INJECT_NAN" in err
    assert "--allow-env-file-var LD_PRELOAD --allow-env-file-var SDTRAIN_INJECT_NAN" in err
    assert not run_dir.exists()


def test_refusal_holds_for_remote_nodes(write_recipe, tmp_path):
    (tmp_path / "hf").write_text("a slots=1\nb slots=1\n")
    (tmp_path / ".sdtrain_env").write_text("PYTHONPATH=/elsewhere\n")
    args = ["launch", write_recipe(), "--hostfile", tmp_path / "hf", "--dry-run", "--json"]
    result = sdtrain(*args, cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2 and "--allow-env-file-var PYTHONPATH" in " ".join(result.stderr.split())
    result = sdtrain(*args, ALLOW, "PYTHONPATH", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "PYTHONPATH=/elsewhere" in " ".join(json.loads(result.stdout)["nodes"][1]["command"])


def test_the_launch_names_the_file_and_the_variables_not_their_values(write_recipe, tmp_path):
    (tmp_path / ".sdtrain_env").write_text("NCCL_IB_HCA=mlx5_1\nWANDB_API_KEY=secret-value\n")
    result = sdtrain("launch", write_recipe(), "--dry-run", "--json", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert f"read {tmp_path / '.sdtrain_env'}: sets NCCL_IB_HCA, WANDB_API_KEY" in " ".join(result.stderr.split())
    assert "secret-value" not in result.stderr + result.stdout
    plan = json.loads(result.stdout)
    assert plan["env_file"] == {"path": str(tmp_path / ".sdtrain_env"), "sets": ["NCCL_IB_HCA", "WANDB_API_KEY"]}
    assert plan["drills"] == []
