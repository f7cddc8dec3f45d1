"""`.sdtrain_env` applies to a local run as it does to remote nodes; the launch names the file
it read and the variables it set, and refuses the names that decide which code runs or make
the run fail on purpose unless the launch allows each by name."""

import json
import os

import pytest

from conftest import sdtrain
from sdtrain.errors import UserInputError
from sdtrain.launch.env_guard import GUARDED, guarded_reason
from sdtrain.launch.exports import MAX_ENV_FILE_BYTES, exported_environment, load_env_file

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


# One name of each row of env_guard.GUARDED: what loads a library, a module, a plugin or a
# compiled kernel, what chooses a program, what a shell sources, the devices, the drills.
GUARDED_NAMES = ["PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT",
                 "PATH", "GCONV_PATH", "BASH_ENV", "ENV", "SHELLOPTS", "PS4",
                 "NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN", "NCCL_CONF_FILE",
                 "CUDA_INJECTION64_PATH", "NVTX_INJECTION64_PATH", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR",
                 "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH", "PERL5LIB", "PERLLIB", "PERL5OPT",
                 "CUDA_VISIBLE_DEVICES", "SDTRAIN_INJECT_NAN"]
# Tuning and places to write: they choose how code runs, not which.
ORDINARY_NAMES = ["NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_TOPO_FILE", "OMP_NUM_THREADS",
                  "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_MAX_CONNECTIONS", "HF_HOME", "WANDB_API_KEY", "MALLOC_ARENA_MAX",
                  "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCHINDUCTOR_MAX_AUTOTUNE", "TORCH_LOGS", "PYTORCH_CUDA_ALLOC_CONF",
                  "MY_PATH", "LIBPATH", "SDTRAIN_TIMEOUT"]


@pytest.mark.parametrize("name", GUARDED_NAMES)
def test_a_guarded_name_in_the_file_is_refused_unless_allowed(tmp_path, name):
    (tmp_path / ".sdtrain_env").write_text(f"NCCL_IB_HCA=mlx5\n{name}=x\n")
    with pytest.raises(UserInputError) as err:
        load_env_file(tmp_path, tmp_path)
    assert str(err.value).startswith(f"{tmp_path / '.sdtrain_env'} sets {name} ({name}: {guarded_reason(name)})")
    assert f"--allow-env-file-var {name}" in str(err.value)
    assert load_env_file(tmp_path, tmp_path, allowed=[name]).variables == {"NCCL_IB_HCA": "mlx5", name: "x"}
    with pytest.raises(UserInputError):  # allowing one name allows no other, nor does a pattern
        load_env_file(tmp_path, tmp_path, allowed=["PYTHON", "PYTHON*", "LD_*", "NCCL_*_PLUGIN"])


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_an_ordinary_name_in_the_file_passes(tmp_path, name):
    (tmp_path / ".sdtrain_env").write_text(f"{name}=x\n")
    assert guarded_reason(name) is None
    assert load_env_file(tmp_path, tmp_path).variables == {name: "x"}


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


def test_every_guarded_row_says_why():
    assert all(why and pattern == pattern.strip() for pattern, why in GUARDED)
    assert all(guarded_reason(name) for name in GUARDED_NAMES)


def test_refusal_names_each_variable_and_why(write_recipe, tmp_path):
    """Reproduction: NCCL_NET_PLUGIN, CUDA_INJECTION64_PATH, BASH_ENV and PATH from a found file
    used to reach every worker with only the notice."""
    (tmp_path / ".sdtrain_env").write_text("NCCL_DEBUG=INFO\nNCCL_NET_PLUGIN=/tmp/x.so\nCUDA_INJECTION64_PATH=/tmp/y.so\n"
                                           "BASH_ENV=/tmp/z.sh\nPATH=/tmp/bin\n")
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write_recipe(), "--run-dir", run_dir, cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 2, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert f"{tmp_path / '.sdtrain_env'} sets NCCL_NET_PLUGIN, CUDA_INJECTION64_PATH, BASH_ENV, PATH (" in err
    assert "NCCL_NET_PLUGIN: NCCL loads the plugin library" in err and "BASH_ENV: every non-interactive bash" in err
    assert ("--allow-env-file-var NCCL_NET_PLUGIN --allow-env-file-var CUDA_INJECTION64_PATH "
            "--allow-env-file-var BASH_ENV --allow-env-file-var PATH") in err
    assert "Traceback" not in result.stderr and not run_dir.exists()


def _refused_before_launch(recipe, tmp_path, *message):
    run_dir = tmp_path / "run"
    result = sdtrain("launch", recipe, "--run-dir", run_dir, cwd=tmp_path, env={"HOME": str(tmp_path)}, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    err = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr  # one message (rich may wrap it)
    for text in message:
        assert text in err, err
    assert not run_dir.exists()


def test_a_fifo_env_file_is_refused_without_blocking(write_recipe, tmp_path):
    os.mkfifo(tmp_path / ".sdtrain_env")  # no writer: reading it would wait forever
    _refused_before_launch(write_recipe(), tmp_path, f"{tmp_path / '.sdtrain_env'} is a FIFO (named pipe), not a regular file")


def test_a_huge_env_file_is_refused_by_its_size_unread(write_recipe, tmp_path):
    """Reproduction: a 1 GB `.sdtrain_env` was read whole (a 200 MB one cost 1.28 GB of memory)."""
    with open(tmp_path / ".sdtrain_env", "wb") as sparse:
        sparse.truncate(1 << 30)  # a gigabyte that takes no disk
    _refused_before_launch(write_recipe(), tmp_path, f"{tmp_path / '.sdtrain_env'} is 1,073,741,824 bytes",
                           f"at most {MAX_ENV_FILE_BYTES:,}")


def test_a_directory_named_like_the_env_file_is_refused_not_skipped(write_recipe, tmp_path):
    (tmp_path / ".sdtrain_env").mkdir()
    _refused_before_launch(write_recipe(), tmp_path, f"{tmp_path / '.sdtrain_env'}: Is a directory",
                           "every launch reads .sdtrain_env from the working directory")
