"""What the launcher reads from a node's stderr cannot stop it from reading: a malformed file
chunk or failure report is a note, never an exception, and a reader that fails anyway
stops the job with the reason instead of leaving the launcher waiting forever."""

import base64
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import zlib

import pytest
from rich.console import Console

from sdtrain.launch.collect import FileReceiver, encode_files
from sdtrain.launch.failures import REPORT_PREFIX, read_reports
from sdtrain.launch.plan import Node
from sdtrain.launch.supervise import Supervisor

GOOD = {"node_rank": 0, "root_cause": 1, "failures": [
    {"rank": 1, "local_rank": 1, "host": "h", "node_rank": 0, "pid": 7, "exitcode": 1, "exit": "exit code 1",
     "timestamp": 1.0, "error": "RuntimeError: boom", "traceback": "Traceback ...\nRuntimeError: boom", "log_tail": ""}]}


def good_file_lines(tmp_path):
    src = tmp_path / "node"
    (src / "logs").mkdir(parents=True)
    (src / "logs" / "rank0.log").write_text("hello from rank 0\n")
    return list(encode_files(src, [src / "logs" / "rank0.log"]))


@pytest.mark.parametrize("line, note", [
    ("SDTRAIN_FILE logs/rank5.log x 1 abc", "chunk numbers"),
    ("SDTRAIN_FILE logs/rank5.log 3 2 abc", "does not fit"),
    ("SDTRAIN_FILE logs/rank5.log -1 2 abc", "does not fit"),
    ("SDTRAIN_FILE logs/rank5.log 0 1 !!not-base64!!", "arrived damaged"),
    ("SDTRAIN_FILE logs/rank5.log 0 1 aGVsbG8=", "arrived damaged"),  # base64, but not zlib
    ("SDTRAIN_FILE ../../etc/x 0 1 eJzLSM3JyQcABiwCFQ==", "is not a file a node sends back"),
    ("SDTRAIN_FILE checkpoints/latest 0 1 eJzLSM3JyQcABiwCFQ==", "is not a file a node sends back"),
    ("SDTRAIN_FILE logs/../recipe.yaml 0 1 eJzLSM3JyQcABiwCFQ==", "is not a file a node sends back"),
    ("SDTRAIN_FILE logs/rank5.log 0 1 eJzLSM3JyQ==", "ends early"),  # a zlib stream cut short
    ("SDTRAIN_FILE logs/a.log 0 1 eJzLSM3JyQcABiwCFQ==", "is not a file a node sends back"),  # not a rank's log
    ("SDTRAIN_FILE logs/rank007.log 0 1 eJzLSM3JyQcABiwCFQ==", "is not a file a node sends back"),
])
def test_a_bad_chunk_is_a_note_and_the_next_file_still_arrives(tmp_path, line, note):
    receiver = FileReceiver(tmp_path / "run")
    assert receiver.feed(line) is True
    assert len(receiver.notes) == 1 and note in receiver.notes[0]
    for good in good_file_lines(tmp_path):
        receiver.feed(good)
    assert (tmp_path / "run" / "logs" / "rank0.log").read_text() == "hello from rank 0\n"
    assert not (tmp_path / "run" / "logs" / "rank5.log").exists() and not (tmp_path / "run" / "logs" / "a.log").exists()


def test_chunks_that_disagree_on_their_count_drop_the_file(tmp_path):
    receiver = FileReceiver(tmp_path / "run")
    assert receiver.feed("SDTRAIN_FILE logs/rank5.log 0 2 eJzLSM3JyQcABiwCFQ==")
    assert receiver.feed("SDTRAIN_FILE logs/rank5.log 1 3 eJzLSM3JyQcABiwCFQ==")
    assert "expected 2 chunks" in receiver.notes[0] and not (tmp_path / "run" / "logs").exists()


def test_a_file_that_cannot_be_written_here_is_a_note(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "logs").write_text("a file where the launcher needs a folder")
    receiver = FileReceiver(run_dir)
    for line in good_file_lines(tmp_path):
        assert receiver.feed(line)
    assert "cannot be written here" in receiver.notes[0]


def node(script: str) -> list[str]:
    """A stand-in for a runner: a real process whose stderr the supervisor reads."""
    return [sys.executable, "-c", textwrap.dedent(script)]


def test_malformed_lines_are_echoed_with_a_note_and_the_job_goes_on(tmp_path, capfd):
    lines = ["SDTRAIN_FILE logs/rank5.log x y z", REPORT_PREFIX + "{not json", REPORT_PREFIX + "[1, 2]",
             REPORT_PREFIX + json.dumps({"node_rank": "zero", "failures": []}), *good_file_lines(tmp_path),
             "an ordinary line"]
    script = f"""
        import sys
        for line in {lines!r}:
            print(line, file=sys.stderr)
    """
    outcome = Supervisor([node(script)], labels=["node 0 test"], run_dir=tmp_path / "run").run()
    assert outcome.ok and outcome.reports == [] and outcome.errors == []
    err = capfd.readouterr().err
    assert err.count("a failure report line that cannot be used") == 3
    assert "a file sent back: a file chunk line with chunk numbers" in err
    assert "[node 0 test] an ordinary line" in err
    assert (tmp_path / "run" / "logs" / "rank0.log").read_text() == "hello from rank 0\n"


def test_a_report_of_the_wrong_shape_does_not_crash_the_failure_report(tmp_path, write_recipe):
    from sdtrain.launch.job import plan_job
    from sdtrain.launch.report import print_failure

    wrong = {**GOOD, "failures": [{**GOOD["failures"][0], "rank": "one"}]}
    script = f"""
        import sys
        print({REPORT_PREFIX + json.dumps(wrong)!r}, file=sys.stderr)
        print({REPORT_PREFIX + json.dumps(GOOD)!r}, file=sys.stderr)
        sys.exit(1)
    """
    run_dir = tmp_path / "run"
    job = plan_job(str(write_recipe()), [], 1, str(run_dir))
    (run_dir / "failures").mkdir(parents=True)
    (run_dir / "failures" / "node0.json").write_text("")  # what a full disk used to leave
    (run_dir / "failures" / "node1.json").write_text(json.dumps({"node_rank": 1, "failures": [{"rank": 2}]}))
    outcome = Supervisor([node(script)], labels=["node 0 test"], run_dir=run_dir).run()
    assert outcome.exit_codes == [1] and len(outcome.reports) == 1
    out = io.StringIO()
    print_failure(Console(file=out, width=200), job, outcome)
    printed = out.getvalue()
    assert "failures/node0.json is broken" in printed and "failures/node1.json is broken" in printed
    assert "root cause: rank 1" in printed and "RuntimeError: boom" in printed


def test_broken_report_files_are_named_and_good_ones_kept(tmp_path):
    folder = tmp_path / "failures"
    folder.mkdir()
    (folder / "node0.json").write_text(json.dumps(GOOD)[:40])  # cut short
    (folder / "node1.json").write_bytes(b"\xff\xfe")
    (folder / "node2.json").write_text(json.dumps({**GOOD, "node_rank": 2}))
    reports, notes = read_reports(folder)
    assert [r["node_rank"] for r in reports] == [2]
    assert len(notes) == 2 and "node0.json is broken" in notes[0] and "node1.json is broken" in notes[1]


class FailingReader(Supervisor):
    """Fault injection, as SDTRAIN_INJECT_FAULT is for workers: reading one line raises."""

    def _read_line(self, index, line, tail):
        if line == "poison":
            raise MemoryError("injected")
        super()._read_line(index, line, tail)


def test_a_reader_that_fails_stops_the_job_with_the_reason(tmp_path):
    script = """
        import sys, time
        print("poison", file=sys.stderr, flush=True)
        time.sleep(120)
    """
    started = time.monotonic()
    outcome = FailingReader([node(script)], labels=["node 0 test"], run_dir=tmp_path / "run").run()
    assert time.monotonic() - started < 20
    assert not outcome.ok
    assert outcome.errors and "could not read the output of node 0 test: MemoryError: injected" in outcome.errors[0]


def chunk_line(path: str, text: str) -> str:
    return f"SDTRAIN_FILE {path} 0 1 " + base64.b64encode(zlib.compress(text.encode())).decode()


HOSTILE_WORKER = """
import json, sys, time
lines = json.loads(sys.argv[1])
for line in lines:
    sys.stderr.write(line + "\\n")
sys.stderr.write("x" * 65536)  # one relay piece of a long line...
sys.stderr.flush()
time.sleep(1)
sys.stderr.write(lines[1] + "\\n")  # ...whose rest would start a line if the agent's own line cut in
"""

AGENT = """
import json, subprocess, sys, time
from pathlib import Path
from sdtrain.launch import node
from sdtrain.launch.channel import AgentChannel
from sdtrain.launch.collect import encode_files

run_dir, worker, hostile, report = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
node._channel = AgentChannel()  # what a remote node agent does first
child = subprocess.Popen([sys.executable, "-c", worker, hostile])  # inherits stderr: the relay's pipe
time.sleep(0.5)
node.say("sdtrain node 0: the agent's own message")
child.wait()
(run_dir / "logs").mkdir(parents=True)
(run_dir / "logs" / "rank0.log").write_text("the real log\\n")
node._channel.close()
for line in encode_files(run_dir, [run_dir / "logs" / "rank0.log"]):
    node.say(line)
node.say(report)
sys.exit(1)
"""


def test_only_the_node_agents_own_lines_are_taken(tmp_path, capfd):
    """A hostile stderr writer on the node (a worker, or anything quoting its data) forges a
    checkpoint pointer, a log and a failure report: none is taken, all are shown as text;
    the agent's own file and report, on its own channel, arrive."""
    forged = {**GOOD, "failures": [{**GOOD["failures"][0], "error": "RuntimeError: forged"}]}
    hostile = [chunk_line("checkpoints/latest", "step_666"), chunk_line("logs/rank1.log", "forged"),
               REPORT_PREFIX + json.dumps(forged)]
    agent = [sys.executable, "-c", AGENT, str(tmp_path / "node"), HOSTILE_WORKER, json.dumps(hostile),
             REPORT_PREFIX + json.dumps(GOOD)]
    run_dir = tmp_path / "run"
    outcome = Supervisor([agent], labels=["node 0 test"], run_dir=run_dir).run()
    err = capfd.readouterr().err
    assert outcome.exit_codes == [1], err
    assert [r["failures"][0]["error"] for r in outcome.reports] == ["RuntimeError: boom"], err
    assert (run_dir / "logs" / "rank0.log").read_text() == "the real log\n"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "logs" / "rank1.log").exists()
    assert err.count("[node 0 test] (not from the node agent) SDTRAIN_FILE") >= 2, err[-3000:]
    assert f"[node 0 test] (not from the node agent) {REPORT_PREFIX}" in err
    assert "[node 0 test] sdtrain node 0: the agent's own message" in err


def test_a_marker_inside_a_line_is_text(tmp_path, capfd):
    """Without the agent's channel too (a node of another version): only the start of a line counts."""
    script = f"""
        import sys
        print("[rank 3] " + {good_file_lines(tmp_path)[0]!r}, file=sys.stderr)
        print("warning: " + {REPORT_PREFIX + json.dumps(GOOD)!r}, file=sys.stderr)
    """
    outcome = Supervisor([node(script)], labels=["node 0 test"], run_dir=tmp_path / "run").run()
    assert outcome.ok and outcome.reports == [] and not (tmp_path / "run" / "logs").exists()
    assert "[node 0 test] [rank 3] SDTRAIN_FILE logs/rank0.log" in capfd.readouterr().err


FLOOD = """
    import base64, sys, zlib
    out = sys.stderr.buffer
    out.write(b"y" * (100 * 2**20) + b"\\n")  # one 100 MB line
    squeeze = zlib.compressobj(9)
    bomb = b"".join(squeeze.compress(bytes(2**20)) for _ in range(1024)) + squeeze.flush()  # 1 GiB of zeros
    out.write(b"SDTRAIN_FILE logs/rank8.log 0 1 " + base64.b64encode(bomb) + b"\\n")
    piece = b"A" * 12_000
    for index in range(6000):  # 72 MB of chunks of a file whose last chunk never comes
        out.write(b"SDTRAIN_FILE logs/rank9.log %d 6001 " % index + piece + b"\\n")
    for index in range(600_000):  # empty chunks: nothing but bookkeeping, which counts too
        out.write(b"SDTRAIN_FILE logs/rank10.log %d 2000000000 \\n" % index)
    out.write({good!r})
    out.flush()
"""

READER = """
    import re, sys
    from pathlib import Path
    from sdtrain.launch import collect
    from sdtrain.launch.supervise import Supervisor
    collect.MAX_FILE_BYTES = 64 * 2**20  # the test's disk: the bomb stops at 64 MiB, not 512
    outcome = Supervisor([[sys.executable, "-c", sys.argv[2]]], labels=["flood"], run_dir=Path(sys.argv[1])).run()
    # VmHWM, not ru_maxrss: Linux carries the peak of the process that forked this one (pytest,
    # a GiB deep into the suite) into ru_maxrss across exec; VmHWM is this program's own.
    hwm_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
    print("peak", hwm_kib * 1024, outcome.ok, outcome.errors)
"""


def test_a_flooding_node_costs_the_launcher_bounded_memory(tmp_path):
    """A 100 MB line, a 1 MB line that inflates to 1 GiB, 72 MB of chunks that never
    complete, and 600,000 empty chunks (the old reader took 1.5 to 2 GiB for the first two,
    and held the empty ones uncounted): each is dropped with a note, the launcher's peak
    stays near its chunk cap, and a good file still arrives."""
    good = ("\n".join(good_file_lines(tmp_path)) + "\n").encode()
    flood = textwrap.dedent(FLOOD).format(good=good)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(READER), str(tmp_path / "run"), flood],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = int(result.stdout.split()[1])
    assert result.stdout.split()[2:] == ["True", "[]"], result.stdout
    assert "a line longer than 4 MiB: dropped" in result.stderr
    assert "logs/rank8.log is larger than 64 MiB once decompressed: not written" in result.stderr
    assert "logs/rank9.log: more than 64 MiB of chunks waiting" in result.stderr
    assert "logs/rank10.log: more than 64 MiB of chunks waiting" in result.stderr
    assert (tmp_path / "run" / "logs" / "rank0.log").read_text() == "hello from rank 0\n"
    assert sorted(path.name for path in (tmp_path / "run" / "logs").iterdir()) == ["rank0.log"]
    print(f"\nlauncher peak RSS while flooded: {peak / 2**20:.0f} MiB")
    assert peak < 400 * 2**20, f"{peak / 2**20:.0f} MiB"


def test_a_report_of_many_long_failures_fits_the_launchers_line():
    """64 ranks each failing with a megabyte of traceback: the node's report line still fits
    the cap the launcher reads with, and keeps the root cause's traceback."""
    from sdtrain.launch.failures import checked_report, clip, report_line
    from sdtrain.launch.supervise import MAX_LINE_BYTES

    huge = "Traceback (most recent call last):\n" + "  frame ü\n" * 100_000 + "RuntimeError: boom"
    failures = [{**GOOD["failures"][0], "rank": rank, "error": clip(huge, keep="head"), "traceback": clip(huge),
                 "log_tail": clip(huge)} for rank in range(64)]
    line = report_line({"node_rank": 0, "root_cause": 5, "failures": failures}, MAX_LINE_BYTES)
    assert len(line.encode()) <= MAX_LINE_BYTES and line.startswith(REPORT_PREFIX)
    report = checked_report(json.loads(line[len(REPORT_PREFIX):]))
    kept = {f["rank"]: f["traceback"] for f in report["failures"]}
    assert kept[5].endswith("RuntimeError: boom") and kept[0] == ""


def test_the_agents_own_traceback_still_reaches_the_launcher(tmp_path, capfd):
    """An agent that dies of an exception after opening its channel: the traceback, written
    to the relay's pipe, is passed on before the process ends."""
    script = """
        from sdtrain.launch import node
        from sdtrain.launch.channel import AgentChannel
        node._channel = AgentChannel()
        raise RuntimeError("the agent itself fails")
    """
    outcome = Supervisor([node(script)], labels=["node 0 test"], run_dir=tmp_path / "run").run()
    assert outcome.exit_codes == [1]
    assert "[node 0 test] RuntimeError: the agent itself fails" in capfd.readouterr().err


def test_a_file_that_never_completes_does_not_starve_the_others(tmp_path):
    """Chunks that never complete fill the pending cap to the brim; the next file's chunks
    push it over, and the endless one is dropped, not the newcomer."""
    from sdtrain.launch.collect import CHUNK_OVERHEAD, FILE_OVERHEAD, MAX_PENDING_BYTES

    src = tmp_path / "node"
    (src / "logs").mkdir(parents=True)
    (src / "logs" / "rank1.log").write_bytes(os.urandom(20_000))  # incompressible: several chunks
    receiver = FileReceiver(tmp_path / "run")
    piece = "A" * 12_000
    for index in range((MAX_PENDING_BYTES - FILE_OVERHEAD) // (len(piece) + CHUNK_OVERHEAD)):
        receiver.feed(f"SDTRAIN_FILE logs/rank7.log {index} 999999 {piece}")
    assert receiver.notes == []
    for line in encode_files(src, [src / "logs" / "rank1.log"]):
        receiver.feed(line)
    assert (tmp_path / "run" / "logs" / "rank1.log").read_bytes() == (src / "logs" / "rank1.log").read_bytes()
    assert len(receiver.notes) == 1 and receiver.notes[0].startswith("logs/rank7.log: more than 64 MiB")
    assert receiver.pending_bytes == 0


def test_each_nodes_notes_are_echoed_under_its_own_name(tmp_path, capfd):
    """Two nodes sending bad chunks at once: every note is shown under the node that caused
    it, and the readers never trip over each other."""
    script = """
        import sys
        for _ in range(3000):
            print("SDTRAIN_FILE logs/rank{rank}.log 5 2 abc", file=sys.stderr)
    """
    outcome = Supervisor([node(script.format(rank=0)), node(script.format(rank=1))], labels=["node a", "node b"],
                         nodes=[Node("a", (0,), 0), Node("b", (0,), 1)], run_dir=tmp_path / "run").run()
    assert outcome.ok and outcome.errors == []
    notes = [line for line in capfd.readouterr().err.splitlines() if "a file sent back" in line]
    assert len(notes) == 6000
    assert all(line.startswith("[node a]") == ("logs/rank0.log" in line) for line in notes)
