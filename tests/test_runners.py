"""Runners as pure argv builders, the exported environment, and the launch plan from the
command line (hostfile, launcher choice, master, errors as exit 2 with nothing launched)."""

import json
import os
import shlex
import subprocess

import pytest

from conftest import sdtrain
from sdtrain.errors import UserInputError
from sdtrain.launch.exports import exported_environment, parse_env_file
from sdtrain.launch.placement import DEFAULT_MASTER_PORT, LaunchRequest, build_plan
from sdtrain.launch.plan import LaunchPlan, Node
from sdtrain.launch.runners import (
    SSH_DEFAULTS, RemoteSetup, mpirun_command, node_agent_argv, pdsh_command, remote_commands, remote_shell,
    srun_command, ssh_command,
)

PLAN = LaunchPlan([Node("w0", (0, 1), 0), Node("w1", (2, 3), 1)], "w0", 29500, "auto", "abc123", launcher="ssh")
SETUP = RemoteSetup(cwd="/work dir", python="/venv/bin/python", env={"NCCL_DEBUG": "INFO", "SDTRAIN_X": "a b'c"},
                    ssh_port=2222, ssh_options=("-i", "/k"))
RECIPE_JSON = json.dumps({"name": "it's", "data": {"source": "a b;$(rm -rf /)"}})


def agent(node=PLAN.nodes[1]):
    return node_agent_argv(PLAN, node, "/runs/x y", RECIPE_JSON, "", SETUP.python)


def test_agent_argv_names_node_rank_master_and_slots():
    argv = agent()
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert argv[:3] == ["/venv/bin/python", "-m", "sdtrain.launch.node"]
    assert flags["--nnodes"] == "2" and flags["--node-rank"] == "1" and flags["--nproc"] == "2"
    assert flags["--slots"] == "2,3" and flags["--master-addr"] == "w0" and flags["--master-port"] == "29500"
    assert flags["--run-id"] == "abc123" and flags["--recipe-json"] == RECIPE_JSON


def test_ssh_argv():
    argv = ssh_command(PLAN.nodes[1], agent(), SETUP)
    assert argv[:5] == ["ssh", "-i", "/k", "-p", "2222"]  # the user's options first: ssh keeps the first value
    assert argv[5:-3] == list(SSH_DEFAULTS) and "BatchMode=yes" in argv
    assert argv[-3:-1] == ["--", "w1"]  # no host name can be taken for an option
    assert argv[-1].startswith("cd '/work dir' && exec env NCCL_DEBUG=INFO 'SDTRAIN_X=a b'\"'\"'c' /venv/bin/python -m")


def test_remote_shell_carries_every_value_intact():
    """A real POSIX shell parses the remote command back into exactly the argv and env."""
    argv = ["printf", "%s\\n", "--recipe-json", RECIPE_JSON, "", "a\nb"]
    setup = RemoteSetup(cwd="/", python="python", env={"SDTRAIN_X": "a b'c\"$HOME`x`", "EMPTY": ""})
    script = remote_shell(argv, setup) + '; echo "[$SDTRAIN_X][$EMPTY]"'
    out = subprocess.run(["sh", "-c", remote_shell(["env"], setup)], capture_output=True, text=True).stdout
    assert "SDTRAIN_X=a b'c\"$HOME`x`" in out.splitlines() and "EMPTY=" in out.splitlines()
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
    assert out == f"--recipe-json\n{RECIPE_JSON}\n\na\nb\n"  # exec: nothing after it runs


def test_pdsh_argv():
    argv = pdsh_command(PLAN.nodes[0], agent(PLAN.nodes[0]), SETUP)
    assert argv[0] == "env" and argv[1] == "PDSH_SSH_ARGS_APPEND=-i /k -p 2222 " + " ".join(SSH_DEFAULTS)
    assert argv[2:9] == ["pdsh", "-S", "-N", "-R", "ssh", "-w", "w0"]
    assert shlex.split(argv[9])[:2] == ["cd", "/work dir"]


def test_pdsh_and_mpirun_refuse_ssh_options_they_would_split():
    setup = RemoteSetup(cwd="/", python="python", ssh_options=("-o", "ProxyCommand=ssh -W %h:%p bastion"))
    for build in (pdsh_command, mpirun_command):
        with pytest.raises(UserInputError, match="split on spaces.*ProxyCommand"):
            build(PLAN.nodes[0], agent(), setup)


def test_srun_argv():
    argv = srun_command(PLAN.nodes[1], agent(), SETUP)
    assert argv[:7] == ["srun", "--nodes=1", "--ntasks=1", "--nodelist=w1", "--overlap", "--chdir=/work dir",
                        "--job-name=sdtrain-node1"]
    assert argv[7:10] == ["env", "NCCL_DEBUG=INFO", "SDTRAIN_X=a b'c"]  # no shell: values as they are
    assert argv[10:] == agent()


def test_mpirun_argv():
    argv = mpirun_command(PLAN.nodes[1], agent(), RemoteSetup(cwd="/w", python="p", run_as_root=True))
    assert argv[:12] == ["mpirun", "-n", "1", "--host", "w1", "--bind-to", "none", "--wdir", "/w",
                         "--allow-run-as-root", "--mca", "plm_rsh_args"]
    assert argv[12] == " ".join(SSH_DEFAULTS)
    assert argv[13:] == agent()


@pytest.mark.parametrize("launcher, extra", [("ssh", ["--remote", "--stop-on-stdin-eof"]), ("pdsh", ["--remote"]),
                                             ("slurm", ["--remote"]), ("mpirun", ["--remote"])])
def test_every_remote_runner_starts_the_agent_of_each_node(launcher, extra):
    plan = LaunchPlan(PLAN.nodes, "w0", 29500, "auto", "abc123", launcher=launcher)
    commands = remote_commands(plan, "/runs/x y", RECIPE_JSON, "", SETUP)
    assert len(commands) == 2
    for node, argv in zip(plan.nodes, commands):
        text = " ".join(argv)
        assert f"--node-rank {node.node_rank}" in text and f"--slots {','.join(map(str, node.slots))}" in text
        assert text.endswith(" ".join(extra))


def test_env_file_format():
    env = parse_env_file("# comment\n\nA=1\nexport B = two words \nC='quoted # not a comment'\nD=\"x=y\"\nE=\n")
    assert env == {"A": "1", "B": "two words", "C": "quoted # not a comment", "D": "x=y", "E": ""}


@pytest.mark.parametrize("text, message", [
    ("A=1\nnot a line\n", ".sdtrain_env line 2: 'not a line': expected KEY=VALUE"),
    ("1A=x\n", "line 1: '1A=x': expected KEY=VALUE with KEY a variable name"),
    ("=x\n", "line 1"),
    ("A='open\n", "line 1: \"A='open\": the value opens a ' quote and does not close it"),
])
def test_env_file_errors_name_the_line(text, message):
    with pytest.raises(UserInputError) as err:
        parse_env_file(text)
    assert message in str(err.value)


def test_exported_environment(tmp_path):
    environ = {"NCCL_IB_HCA": "mlx5", "PYTHONPATH": "/p", "CUDA_HOME": "/c", "CUDA_VISIBLE_DEVICES": "3",
               "OMP_NUM_THREADS": "4", "SDTRAIN_INJECT_FAULT": "1:3", "HOME": "/root", "PATH": "/bin", "AWS_SECRET": "s"}
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    env = exported_environment(environ, cwd, home)
    assert env == {"CUDA_HOME": "/c", "NCCL_IB_HCA": "mlx5", "OMP_NUM_THREADS": "4", "PYTHONPATH": "/p",
                   "SDTRAIN_INJECT_FAULT": "1:3"}
    (home / ".sdtrain_env").write_text("NCCL_IB_HCA=mlx5_1\nFROM=home\n")
    assert exported_environment(environ, cwd, home)["FROM"] == "home"
    (cwd / ".sdtrain_env").write_text("FROM=cwd\n")  # the working directory's file is the one read
    env = exported_environment(environ, cwd, home)
    assert env["FROM"] == "cwd" and env["NCCL_IB_HCA"] == "mlx5"


def plan_for(tmp_path, text=None, nproc=1, nproc_given=False, environ=None, **request):
    if text is not None:
        (tmp_path / "hf").write_text(text)
        request["hostfile"] = str(tmp_path / "hf")
    return build_plan(LaunchRequest(**request), nproc, nproc_given, "auto", None, "rid", environ or {})


def test_plans(tmp_path):
    plan, launcher = plan_for(tmp_path, "w0 slots=2\nw1 slots=2\n")
    assert launcher == "ssh" and plan.master_addr == "w0" and plan.master_port == DEFAULT_MASTER_PORT
    assert [(n.host, n.slots, n.node_rank) for n in plan.nodes] == [("w0", (0, 1), 0), ("w1", (0, 1), 1)]
    plan, launcher = plan_for(tmp_path, "localhost slots=2\n")  # this machine alone: no ssh needed
    assert launcher == "local" and plan.master_addr == "127.0.0.1" and plan.master_port != DEFAULT_MASTER_PORT
    plan, launcher = plan_for(tmp_path, "127.0.0.1 slots=2\n127.0.0.2 slots=2\n")
    assert launcher == "ssh" and plan.master_addr == "127.0.0.1" and plan.master_port != DEFAULT_MASTER_PORT
    plan, _ = plan_for(tmp_path, "w0 slots=4\nw1 slots=4\n", launcher="pdsh", master_addr="10.0.0.1",
                       master_port=6000, num_gpus=2, num_nodes=1)
    assert plan.master_addr == "10.0.0.1" and plan.master_port == 6000 and plan.world_size == 2
    plan, launcher = plan_for(tmp_path, nproc=2, include="localhost:1")
    assert launcher == "local" and plan.nodes[0].slots == (1,)
    plan, _ = plan_for(tmp_path, "w0 slots=2\nw1 slots=2\n", node_rank=1)
    assert plan.launcher == "local" and plan.master_port == DEFAULT_MASTER_PORT  # every node must agree on it


def test_slurm_allocation_without_hostfile(tmp_path):
    environ = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    plan, launcher = plan_for(tmp_path, nproc=4, launcher="slurm", environ=environ)
    assert launcher == "slurm" and [n.host for n in plan.nodes] == ["gpu01", "gpu02"] and plan.world_size == 8
    plan, _ = plan_for(tmp_path, nproc=4, launcher="slurm", environ=environ, exclude="gpu01")
    assert [n.host for n in plan.nodes] == ["gpu02"]


@pytest.mark.parametrize("text, request_, message", [
    (None, {"launcher": "ssh"}, "--launcher ssh needs --hostfile"),
    (None, {"launcher": "slurm"}, "--launcher slurm runs inside a Slurm allocation"),
    (None, {"num_nodes": 2}, "--num-nodes 2 needs a hostfile"),
    ("w0 slots=2\n", {"launcher": "local"}, "--launcher local runs on this machine only"),
    ("w0 slots=2\nw1 slots=2\n", {"node_rank": 2}, "--node-rank 2: the plan has 2 node(s)"),
    ("w0 slots=2\nw1 slots=2\n", {"node_rank": 0, "launcher": "ssh"}, "--node-rank runs one node here"),
    ("localhost slots=2\nw1 slots=2\n", {}, "the master is the first host, localhost, a loopback address"),
])
def test_plan_errors(tmp_path, text, request_, message):
    with pytest.raises(UserInputError) as err:
        plan_for(tmp_path, text, **request_)
    assert message in str(err.value)


def test_slurm_hosts_must_be_in_the_allocation(tmp_path):
    environ = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"}
    with pytest.raises(UserInputError, match="hosts n3 are not in this Slurm allocation"):
        plan_for(tmp_path, "n1 slots=1\nn3 slots=1\n", launcher="slurm", environ=environ)


def test_dry_run_json_shows_each_nodes_ssh_command(write_recipe, tmp_path):
    (tmp_path / "hf").write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hf", "--ssh-port", "2222",
                     "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["launcher"] == "ssh" and plan["world_size"] == 4 and plan["master_addr"] == "node-a"
    assert plan["master_port"] == DEFAULT_MASTER_PORT and plan["batch"]["data_parallel"] == 4
    assert [(n["host"], n["slots"], n["node_rank"]) for n in plan["nodes"]] == [("node-a", [0, 1], 0), ("node-b", [0, 1], 1)]
    command = plan["nodes"][1]["command"]
    assert command[0] == "ssh" and command[-2] == "node-b" and "--node-rank 1" in command[-1]
    assert not (tmp_path / "run").exists()


def test_dry_run_text_shows_the_runner_commands(write_recipe, tmp_path):
    (tmp_path / "hf").write_text("node-a slots=1\nnode-b slots=1\n")
    result = sdtrain("launch", write_recipe(), "-H", tmp_path / "hf", "--launcher", "pdsh", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "runner pdsh" in result.stdout and "pdsh -S -N -R ssh -w node-b" in result.stdout


@pytest.mark.parametrize("hostfile, args, message", [
    ("a slots=2\na slots=1\n", [], "line 2: 'a slots=1': host a is already listed on line 1"),
    ("a slots=x\n", [], "line 1: 'a slots=x': slots must be an integer from 1 to 1024"),
    ("a slots=2\nb slots=2\n", ["--include", "c"], "--include 'c': host c is not in the hostfile"),
    ("a slots=2\nb slots=2\n", ["-i", "a", "-e", "b"], "mutually exclusive"),
    ("a slots=2\nb slots=2\n", ["--exclude", "a@b"], "leaves no slot"),
    ("a slots=2\nb slots=2\n", ["--nproc-per-node", "2"], "--nproc-per-node does not go with --hostfile"),
    ("a slots=2\nb slots=2\n", ["--launcher", "mpirun", "--ssh-options", "-o 'A=b c'"], "split on spaces"),
    ("a slots=2\nb slots=2\n", ["--ssh-options", "-o 'unclosed"], "--ssh-options"),
])
def test_bad_input_exits_2_and_launches_nothing(write_recipe, tmp_path, hostfile, args, message):
    (tmp_path / "hf").write_text(hostfile)
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hf", *args, "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_env_file_exits_2(write_recipe, tmp_path):
    (tmp_path / "hf").write_text("a slots=1\nb slots=1\n")
    (tmp_path / ".sdtrain_env").write_text("GOOD=1\nbad line\n")
    result = sdtrain("launch", write_recipe(), "--hostfile", tmp_path / "hf", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2 and ".sdtrain_env line 2: 'bad line'" in result.stderr


def test_slots_narrow_cuda_visible_devices_and_never_widen_it(monkeypatch):
    """CUDA_VISIBLE_DEVICES=4,5 with slots 0-3 once ran on devices 4, 5, 2, 3: a slot past
    the visible devices took its own number. Now it is refused, naming the fix."""
    from sdtrain.launch.node import restrict_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    restrict_devices("1,2", gpus_here=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5,6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(UserInputError, match=r"slots 2,3 are beyond CUDA_VISIBLE_DEVICES=4,5"):
        restrict_devices("0,1,2,3", gpus_here=True)
    for hidden, gpus_here in (("", True), ("4,5", False)):  # GPUs hidden on purpose, or none here: a CPU run
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        restrict_devices("0,1,2,3", gpus_here=gpus_here)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == hidden
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    restrict_devices("2,3", gpus_here=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
