"""The node agent's remote side: its lifeline to the launcher, and a run directory that is
not shared (files sent back over stderr; checkpoints refused up front)."""

import json
import os
import subprocess
import sys
import time

import yaml

from conftest import REPO, TINY, merge
from sdtrain.launch.collect import CHUNK, FileReceiver, encode_files
from sdtrain.launch.plan import free_port

WATCHER = """
import os, time
from sdtrain.launch.lifeline import start_lifeline
started = start_lifeline(lambda reason: (print(reason, flush=True), os._exit(0)), watch_stdin={watch_stdin})
print("watching" if started else "nothing to watch", flush=True)
time.sleep(30)
"""


def watcher(watch_stdin):
    return subprocess.Popen([sys.executable, "-c", WATCHER.format(watch_stdin=watch_stdin)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lifeline_sees_the_stderr_reader_go():
    proc = watcher(watch_stdin=False)
    assert proc.stdout.readline() == "watching\n"
    started = time.monotonic()
    proc.stderr.close()  # what the node sees when ssh, srun or orted dies: no reader on its stderr
    assert proc.stdout.readline() == "the launcher's connection closed\n"
    assert time.monotonic() - started < 2
    proc.wait(timeout=5)


def test_lifeline_stdin_eof_is_a_stop_request_and_input_is_not():
    proc = watcher(watch_stdin=True)
    assert proc.stdout.readline() == "watching\n"
    proc.stdin.write("stray input\n")
    proc.stdin.flush()
    time.sleep(0.3)
    assert proc.poll() is None
    proc.stdin.close()
    assert proc.stdout.readline() == "the launcher asked to stop\n"
    proc.wait(timeout=5)


def test_files_round_trip_in_chunks_interleaved(tmp_path):
    src, dst = tmp_path / "node", tmp_path / "launcher"
    (src / "logs").mkdir(parents=True)
    big = os.urandom(40_000)  # incompressible: several chunks
    (src / "logs" / "rank2.log").write_bytes(big)
    (src / "metrics.jsonl").write_text('{"step": 1}\n')
    lines = list(encode_files(src, [src / "logs" / "rank2.log", src / "metrics.jsonl", src / "missing"]))
    assert len(lines) > 2 and all(len(line) < CHUNK + 100 for line in lines)
    receiver = FileReceiver(dst)
    for line in lines[1::2] + lines[0::2]:  # any order, as long as every chunk comes
        assert not receiver.feed("127.0.0.2: " + line)  # only at the start of a line
        assert receiver.feed(line)
    assert not receiver.feed("ordinary stderr line")
    assert (dst / "logs" / "rank2.log").read_bytes() == big
    assert (dst / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_receiver_never_writes_outside_the_run_directory(tmp_path):
    receiver = FileReceiver(tmp_path / "run")
    line = next(encode_files(tmp_path, [_file(tmp_path / "x")])).replace(" x ", " ../x ")
    assert receiver.feed(line)
    assert not (tmp_path / "run").exists() and receiver.written == []


def _file(path):
    path.write_text("data")
    return path


def agent(tmp_path, recipe, nnodes):
    return subprocess.run(
        [sys.executable, "-m", "sdtrain.launch.node", "--nnodes", str(nnodes), "--node-rank", "0", "--nproc", "1",
         "--slots", "0", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--run-dir", str(tmp_path / "node-run"),
         "--run-id", "rid", "--recipe-json", json.dumps(recipe), "--resume-from", "", "--remote"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def test_node_without_the_shared_run_dir_refuses_checkpoints(tmp_path):
    result = agent(tmp_path, merge(TINY, {"checkpoint": {"at_end": True}}), nnodes=2)
    assert result.returncode == 2
    assert "is not the launcher's here (no shared filesystem), and it saves a checkpoint at the end" in result.stderr
    assert not (tmp_path / "node-run").exists()


def test_node_without_the_shared_run_dir_sends_its_files_back(tmp_path):
    """A real node agent and worker, in a directory the launcher never prepared."""
    recipe = yaml.safe_load(yaml.safe_dump(merge(TINY, {"train": {"steps": 2}})))
    result = agent(tmp_path, recipe, nnodes=1)
    assert result.returncode == 0, result.stderr
    receiver = FileReceiver(tmp_path / "launcher-run")
    for line in result.stderr.splitlines():
        receiver.feed(line)
    got = tmp_path / "launcher-run"
    assert "rank 0: model" in (got / "logs" / "rank0.log").read_text()
    assert [json.loads(line)["step"] for line in (got / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (got / "summary.json").is_file()
