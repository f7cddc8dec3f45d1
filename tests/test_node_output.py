"""What the launcher reads from a node's stderr cannot stop it from reading: a malformed file
chunk or failure report is a note, never an exception, and a reader that fails anyway
stops the job with the reason instead of leaving the launcher waiting forever."""

import io
import json
import sys
import textwrap
import time

import pytest
from rich.console import Console

from sdtrain.launch.collect import FileReceiver, encode_files
from sdtrain.launch.failures import REPORT_PREFIX, read_reports
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
    ("SDTRAIN_FILE logs/a.log x 1 abc", "chunk numbers"),
    ("SDTRAIN_FILE logs/a.log 3 2 abc", "does not fit"),
    ("SDTRAIN_FILE logs/a.log -1 2 abc", "does not fit"),
    ("SDTRAIN_FILE logs/a.log 0 1 !!not-base64!!", "arrived damaged"),
    ("SDTRAIN_FILE logs/a.log 0 1 aGVsbG8=", "arrived damaged"),  # base64, but not zlib
    ("SDTRAIN_FILE ../../etc/x 0 1 eJzLSM3JyQcABiwCFQ==", "outside the run directory"),
])
def test_a_bad_chunk_is_a_note_and_the_next_file_still_arrives(tmp_path, line, note):
    receiver = FileReceiver(tmp_path / "run")
    assert receiver.feed(line) is True
    assert len(receiver.notes) == 1 and note in receiver.notes[0]
    for good in good_file_lines(tmp_path):
        receiver.feed(good)
    assert (tmp_path / "run" / "logs" / "rank0.log").read_text() == "hello from rank 0\n"
    assert not (tmp_path / "run" / "logs" / "a.log").exists()


def test_chunks_that_disagree_on_their_count_drop_the_file(tmp_path):
    receiver = FileReceiver(tmp_path / "run")
    assert receiver.feed("SDTRAIN_FILE logs/a.log 0 2 eJzLSM3JyQcABiwCFQ==")
    assert receiver.feed("SDTRAIN_FILE logs/a.log 1 3 eJzLSM3JyQcABiwCFQ==")
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
    lines = ["SDTRAIN_FILE logs/a.log x y z", REPORT_PREFIX + "{not json", REPORT_PREFIX + "[1, 2]",
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
