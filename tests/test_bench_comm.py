"""`sdtrain bench comm`: real workers on gloo, every collective checked exactly, nccl-tests'
bus bandwidth, and a plain torch.distributed loop measured beside the large all_reduce."""

import json
import re

import pytest

from cluster import HOSTS, running_sshd
from conftest import sdtrain
from sdtrain.bench.comm import CommBenchFailed, run_comm_bench
from sdtrain.bench.comm_spec import OPS, bandwidths, bus_factor, buffer_elements, parse_ops, parse_sizes
from sdtrain.errors import UserInputError
from sdtrain.launch.placement import LaunchRequest

# A shared 2-core machine: the ratio to the plain loop moves with whatever else runs, so the
# bound here is loose; the README reports the measured ratio (best of 5 loops).
PLAIN_LOOP_FACTOR = 3.0


def check_result(result: dict, world: int, sizes: list[int]) -> None:
    assert result["world_size"] == world and result["backend"] == "gloo"
    rows = result["results"]
    assert {(row["op"], row["bytes"]) for row in rows} == {(op, buffer_elements(s, world) * 4) for op in OPS for s in sizes}
    for row in rows:
        assert row["correct"] and row["wrong_ranks"] == [], row
        assert row["time_us"] > 0
        assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"] * bus_factor(row["op"], world), rel=1e-3, abs=2e-4)
    large = max((row for row in rows if row["op"] == "all_reduce"), key=lambda row: row["bytes"])
    assert 1 / PLAIN_LOOP_FACTOR < large["vs_plain"] < PLAIN_LOOP_FACTOR, large


def test_two_ranks_from_a_hostfile_all_ops_correct(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "comm.json"
    result = sdtrain("bench", "comm", "--hostfile", hostfile, "--sizes", "4K..4M:32", "--iters", 5, "--repeats", 3,
                     "--json", out, "--plot", tmp_path / "comm.png", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    check_result(json.loads(out.read_text()), 2, [4096, 131072, 4 * 2**20])
    assert "busbw" in result.stdout and "all_reduce 4M: bus bandwidth" in result.stdout
    assert (tmp_path / "comm.png").read_bytes()[:4] == b"\x89PNG"  # the figure itself: tests/test_plot.py


def test_four_ranks_all_ops_correct(tmp_path):
    out = tmp_path / "comm.json"
    result = sdtrain("bench", "comm", "--nproc", 4, "--sizes", "3000,1M", "--iters", 3, "--repeats", 3,
                     "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # 3000 bytes is no whole number of float32 chunks for 4 ranks: rounded down to 2992.
    check_result(json.loads(out.read_text()), 4, [3000, 2**20])


def test_a_failing_rank_is_the_named_root_cause():
    """Real workers, one op they do not know (the CLI refuses it first; here it reaches them):
    the launcher's Supervisor stops the job and the failure report names the rank and why."""
    with pytest.raises(CommBenchFailed) as failed:
        run_comm_bench(LaunchRequest(), 2, "gloo", ["all_reduce", "no_such_op"], [4096], 2, 1)
    assert failed.value.exit_code == 1
    assert re.match(r"rank [01] on ", str(failed.value)) and "KeyError: 'no_such_op'" in str(failed.value)


@pytest.mark.multinode
def test_two_nodes_over_ssh(tmp_path):
    """Launched like any job: a hostfile of two loopback "nodes", one ssh per node, the same
    node agent machinery; results come back to the launcher."""
    with running_sshd(tmp_path / "sshd") as sshd:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{host} slots=1\n" for host in HOSTS))
        out = tmp_path / "comm.json"
        result = sdtrain("bench", "comm", "--hostfile", hostfile, "--launcher", "ssh", "--ssh-port", sshd.port,
                         "--ssh-options", sshd.options, "--ops", "all_reduce,send_recv", "--sizes", "64K,1M",
                         "--iters", 3, "--repeats", 1, "--json", out, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    comm = json.loads(out.read_text())
    assert comm["nodes"] == 2 and comm["launcher"] == "ssh" and comm["world_size"] == 2
    assert all(row["correct"] for row in comm["results"])


@pytest.mark.parametrize("args, expected", [
    (["--ops", "all_reduce,allreduce"], "unknown op(s) allreduce"),
    (["--ops", ""], "unknown op(s) (none given)"),
    (["--sizes", "12Q"], "'12Q' is not a size"),
    (["--sizes", "1M..1K"], "ends below where it starts"),
    (["--sizes", "1K..1G:1"], "whole factor of at least 2"),
    (["--sizes", "0"], "between 1 byte"),
    (["--nproc", 1], "at least 2 ranks"),
])
def test_bad_input_exits_2_before_anything_starts(args, expected):
    result = sdtrain("bench", "comm", *args)
    assert result.returncode == 2 and expected in result.stderr.replace("\n", " "), result.stderr


def test_sizes_and_bus_factors():
    assert parse_sizes("1K..1M:4") == [2**10, 2**12, 2**14, 2**16, 2**18, 2**20]
    assert parse_sizes("1K..8K") == [1024, 2048, 4096, 8192]
    assert parse_sizes("64M,1K,1kib,512") == [512, 1024, 64 * 2**20]
    assert parse_ops("all") == list(OPS) and parse_ops("broadcast, send_recv") == ["broadcast", "send_recv"]
    with pytest.raises(UserInputError):
        parse_sizes("1K..1G:0")
    # nccl-tests' factors: 2(n-1)/n all-reduce, (n-1)/n gather/scatter/all-to-all, 1 otherwise.
    assert [bus_factor(op, 4) for op in OPS] == [1.5, 0.75, 0.75, 0.75, 1.0, 1.0]
    assert bandwidths("all_reduce", 2 * 10**9, 2.0, 2) == (1.0, 1.0)
    assert buffer_elements(3072, 4) == 768 and buffer_elements(1, 4) == 4
