"""Hostfiles and resource filters: DeepSpeed's semantics, and every error path."""

import time

import pytest
import yaml

from sdtrain.errors import UserInputError
from sdtrain.launch.hostfile import (
    MAX_HOSTS,
    HostfileError,
    expand_hostlist,
    parse_filter,
    parse_hostfile,
    read_hostfile,
    select_resources,
)
from sdtrain.launch.placement import _check_in_allocation

HOSTS = """\
# a comment line, then a blank one

worker-0 slots=4
worker-1 slots=2   # trailing comment
worker-2 slots=4
"""


def hosts():
    return parse_hostfile(HOSTS, "hf")


def test_file_order_is_rank_order_and_comments_are_skipped():
    assert list(hosts().items()) == [("worker-0", 4), ("worker-1", 2), ("worker-2", 4)]
    assert select_resources(hosts()) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1], "worker-2": [0, 1, 2, 3]}


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=4\nworker-0 slots=2\n", "hf line 2: 'worker-0 slots=2': host worker-0 is already listed on line 1"),
    ("worker-0\n", "hf line 1: 'worker-0': expected 'HOST slots=N'"),
    ("worker-0 slots=4 gpus=2\n", "hf line 1: 'worker-0 slots=4 gpus=2': expected 'HOST slots=N'"),
    ("worker-0 slot=4\n", "expected 'HOST slots=N'"),
    ("\n\nworker-0 slots=0\n", "hf line 3: 'worker-0 slots=0': slots must be an integer from 1 to 1024, got '0'"),
    ("worker-0 slots=-1\n", "slots must be an integer from 1 to 1024, got '-1'"),
    ("worker-0 slots=two\n", "slots must be an integer from 1 to 1024, got 'two'"),
    ("worker-0 slots=\n", "slots must be an integer from 1 to 1024, got ''"),
    ("worker-0 slots=99999999999999999999999999\n", "from 1 to 1024"),
    ("worker-0 slots=\u0664\n", "from 1 to 1024"),  # a digit, but not an ASCII one
    ("-oProxyCommand=x slots=1\n", "is not a plain host name"),
    ("gpu[1-2] slots=1\n", "is not a plain host name"),
    ("a,b slots=1\n", "is not a plain host name"),
    ("user@host slots=1\n", "is not a plain host name"),
    ("host\x00x slots=1\n", "is not a plain host name"),
    ("x" * 5000 + " slots=1\n", "..."),  # the message quotes a bounded excerpt
    ("# nothing\n\n", "hf lists no hosts"),
])
def test_bad_hostfile_names_the_line(text, message):
    with pytest.raises(HostfileError) as err:
        parse_hostfile(text, "hf")
    assert message in str(err.value)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match="cannot read hostfile .*nope"):
        read_hostfile(tmp_path / "nope")


@pytest.mark.parametrize("include, expected", [
    ("worker-1", {"worker-1": [0, 1]}),
    ("worker-2@worker-0:1,0", {"worker-0": [0, 1], "worker-2": [0, 1, 2, 3]}),  # hostfile order, sorted slots
    ("worker-0:2@worker-0:3", {"worker-0": [2, 3]}),
    ("worker-0:1,1", {"worker-0": [1]}),
])
def test_include(include, expected):
    assert select_resources(hosts(), include=include) == expected


@pytest.mark.parametrize("exclude, expected", [
    ("worker-1", {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1, 2, 3]}),
    ("worker-0:0,3@worker-2:1", {"worker-0": [1, 2], "worker-1": [0, 1], "worker-2": [0, 2, 3]}),
    ("worker-1:0,1", {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1, 2, 3]}),  # every slot gone: the host too
])
def test_exclude(exclude, expected):
    assert select_resources(hosts(), exclude=exclude) == expected


def test_num_nodes_and_num_gpus():
    assert select_resources(hosts(), num_nodes=2) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1]}
    assert select_resources(hosts(), num_gpus=2) == {"worker-0": [0, 1], "worker-1": [0, 1], "worker-2": [0, 1]}
    assert select_resources(hosts(), num_nodes=1, num_gpus=3) == {"worker-0": [0, 1, 2]}


@pytest.mark.parametrize("filters, message", [
    ({"include": "worker-9"}, "--include 'worker-9': host worker-9 is not in the hostfile (hosts: worker-0, worker-1, worker-2)"),
    ({"exclude": "worker-9:0"}, "--exclude 'worker-9:0': host worker-9 is not in the hostfile"),
    ({"include": "worker-1:2,5"}, "--include 'worker-1:2,5': host worker-1 has slots 0..1, no slot 2, 5"),
    ({"exclude": "worker-0:4"}, "host worker-0 has slots 0..3, no slot 4"),
    ({"include": "worker-0:a"}, "--include 'worker-0:a': slot 'a' of host worker-0 is not a non-negative integer"),
    ({"include": "worker-0:"}, "slot '' of host worker-0 is not a non-negative integer"),
    ({"include": "worker-0@@worker-1"}, "--include 'worker-0@@worker-1': empty host name"),
    ({"exclude": "worker-0@worker-1@worker-2"}, "--exclude 'worker-0@worker-1@worker-2' leaves no slot to run on"),
    ({"include": "worker-0", "exclude": "worker-1"}, "--include and --exclude are mutually exclusive"),
    ({"include": "worker-0", "num_nodes": 1}, "--num-nodes / --num-gpus do not go with --include / --exclude"),
    ({"exclude": "worker-0", "num_gpus": 1}, "do not go with --include / --exclude"),
    ({"num_nodes": 4}, "--num-nodes 4: the hostfile has 3 host(s); give 1..3"),
    ({"num_nodes": 0}, "--num-nodes 0"),
    ({"num_gpus": 3}, "--num-gpus 3: needs 1..slots per host; too few slots on worker-1 (2)"),
    ({"num_gpus": 0}, "--num-gpus 0"),
])
def test_filter_errors_name_the_filter(filters, message):
    with pytest.raises(HostfileError) as err:
        select_resources(hosts(), **filters)
    assert message in str(err.value)


def test_slurm_hostlist():
    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu[08-10,12],login") == ["gpu08", "gpu09", "gpu10", "gpu12", "login"]
    assert expand_hostlist("r[1-2]-n[01-02]") == ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]
    assert expand_hostlist("single") == ["single"]


# --- tens of thousands of hosts (issue 19): refused past Slurm's limit, and no work hosts x hosts ---

def many_hosts(count: int) -> str:
    return "".join(f"h{i} slots=1\n" for i in range(count))


def test_a_hostfile_past_the_host_limit_is_refused_at_once(tmp_path):
    """70,000 hosts fit in the 1 MB size limit; a dry-run of them took minutes, now one line."""
    (tmp_path / "big").write_text(many_hosts(70_000))
    start = time.monotonic()
    with pytest.raises(HostfileError, match="big line 65537: 'h65536 slots=1': host 65,537; "
                                            "a job runs on at most 65,536 hosts"):
        read_hostfile(tmp_path / "big")
    assert time.monotonic() - start < 5
    assert len(parse_hostfile(many_hosts(MAX_HOSTS))) == MAX_HOSTS  # the limit itself is a hostfile


def test_the_largest_plan_is_checked_in_linear_time():
    """The Slurm allocation check compared every host with every node (a list): minutes at 65,536."""
    hosts = parse_hostfile(many_hosts(MAX_HOSTS))
    environ = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": f"h[0-{MAX_HOSTS - 1}]"}
    start = time.monotonic()
    resources = select_resources(hosts, exclude="h5@h7:0")
    _check_in_allocation(resources, environ)
    assert time.monotonic() - start < 10
    with pytest.raises(UserInputError, match=r"hosts h65535 are not in .* \(nodes: h0, h1, .* and 65,527 more\)$"):
        _check_in_allocation(resources, {**environ, "SLURM_JOB_NODELIST": f"h[0-{MAX_HOSTS - 2}]"})
    with pytest.raises(HostfileError, match=r"is not in the hostfile \(hosts: h0, .*, h7 and 65,528 more\)$"):
        select_resources(hosts, include="nowhere")
    assert parse_filter("a:1,0,1,0@b", "--include") == {"a": [1, 0], "b": []}


def test_launch_refuses_too_many_hosts_before_any_work(tmp_path):
    from conftest import TINY, sdtrain

    (tmp_path / "big").write_text(many_hosts(70_000))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY))
    result = sdtrain("launch", tmp_path / "r.yaml", "--hostfile", tmp_path / "big", "--dry-run", timeout=60)
    assert result.returncode == 2 and "a job runs on at most 65,536 hosts" in " ".join(result.stderr.split())
