"""A node sends back its own files only, and never holds the launcher's memory with many:
the plan says which ranks a node holds, so node 1 cannot write node 0's failure report,
rank 0's log or the run's metrics, and a flood of empty chunks or of new files is capped
by count as well as by characters."""

import json
import sys
import textwrap

import pytest

from sdtrain.launch import collect
from sdtrain.launch.collect import MAX_PENDING_FILES_PER_NODE, FileReceiver, Sender, encode_files, senders
from sdtrain.launch.failures import REPORT_PREFIX
from sdtrain.launch.plan import Node
from sdtrain.launch.supervise import Supervisor

NODES = [Node("a", (0, 1), 0), Node("b", (0, 1), 1)]  # node 0 holds ranks 0-1, node 1 ranks 2-3


def report(node_rank: int, rank: int, error: str) -> dict:
    return {"node_rank": node_rank, "root_cause": rank, "failures": [
        {"rank": rank, "local_rank": 0, "host": "h", "node_rank": node_rank, "pid": 7, "exitcode": 1,
         "exit": "exit code 1", "timestamp": 1.0, "error": error, "traceback": error, "log_tail": ""}]}


def file_lines(tmp_path, relative: str, text: str) -> list[str]:
    src = tmp_path / "node"
    (src / relative).parent.mkdir(parents=True, exist_ok=True)
    (src / relative).write_text(text)
    return list(encode_files(src, [src / relative]))


def test_the_plan_says_which_files_are_a_nodes_own():
    node0, node1 = senders(NODES)
    assert node1 == Sender(1, range(2, 4))
    for own in ("failures/node1.json", "hang/node1.json", "logs/rank2.log", "logs/rank3.log", "progress/rank3.json"):
        assert node1.may_send(own), own
    for foreign in ("failures/node0.json", "hang/node0.json", "logs/rank0.log", "logs/rank4.log", "progress/rank1.json",
                    "metrics.jsonl", "summary.json", "comm.json"):
        assert not node1.may_send(foreign), foreign
    assert all(node0.may_send(name) for name in ("metrics.jsonl", "summary.json", "comm.json", "logs/rank1.log"))


def test_another_nodes_files_are_refused_with_a_note(tmp_path):
    receiver = FileReceiver(tmp_path / "run")
    node1 = senders(NODES)[1]
    forged = json.dumps(report(0, 0, "RuntimeError: forged"))
    for relative in ("failures/node0.json", "logs/rank0.log", "metrics.jsonl"):
        for line in file_lines(tmp_path, relative, forged):
            assert receiver.feed(line, node1)
    assert len(receiver.notes) == 3 and all("is not a file of node 1 (ranks 2-3)" in note for note in receiver.notes)
    assert not (tmp_path / "run").exists()
    for line in file_lines(tmp_path, "logs/rank2.log", "rank 2's own\n"):
        receiver.feed(line, node1)
    assert (tmp_path / "run" / "logs" / "rank2.log").read_text() == "rank 2's own\n"


def test_a_flood_of_new_files_keeps_a_few_under_way(tmp_path):
    """The review's flood: a million `SDTRAIN_FILE logs/r<i>.log 0 2 ` lines once held a
    million entries (launcher at 393 MiB, no note). Names that are not the node's are
    refused outright; its own names, never completed, are at most a few at a time."""
    receiver = FileReceiver(tmp_path / "run")
    for i in range(20_000):
        receiver.feed(f"SDTRAIN_FILE logs/r{i}.log 0 2 ")
    assert receiver.parts == {} and len(receiver.notes) == 20_000
    receiver.notes.clear()
    for i in range(20_000):
        receiver.feed(f"SDTRAIN_FILE logs/rank{i}.log 0 2 ")
    assert len(receiver.parts) == MAX_PENDING_FILES_PER_NODE
    assert len(receiver.notes) == 20_000 - MAX_PENDING_FILES_PER_NODE
    assert receiver.notes[0] == (f"logs/rank0.log: node 0 has more than {MAX_PENDING_FILES_PER_NODE} files arriving "
                                 "at once: the oldest, this one, is dropped")
    good = file_lines(tmp_path, "logs/rank0.log", "still arrives\n")
    for line in good:
        receiver.feed(line)
    assert (tmp_path / "run" / "logs" / "rank0.log").read_text() == "still arrives\n"


def test_a_chunk_that_does_not_fit_makes_no_room(tmp_path):
    """A bad first chunk of a new file is refused before it could push out one under way."""
    receiver = FileReceiver(tmp_path / "run")
    for rank in range(MAX_PENDING_FILES_PER_NODE):
        receiver.feed(f"SDTRAIN_FILE logs/rank{rank}.log 0 2 ")
    receiver.feed("SDTRAIN_FILE logs/rank99.log 5 2 ")
    assert len(receiver.notes) == 1 and "chunk 5 of 2 does not fit" in receiver.notes[0]
    assert list(receiver.parts) == [f"logs/rank{rank}.log" for rank in range(MAX_PENDING_FILES_PER_NODE)]


def test_empty_chunks_are_charged_for_their_bookkeeping(tmp_path, monkeypatch):
    """Empty chunks of one file never completing: each costs CHUNK_OVERHEAD of the cap."""
    monkeypatch.setattr(collect, "MAX_PENDING_BYTES", 2**20)  # the cap scaled down: the same arithmetic, faster
    receiver = FileReceiver(tmp_path / "run")
    fits = (2**20 - collect.FILE_OVERHEAD) // collect.CHUNK_OVERHEAD
    for index in range(fits):
        receiver.feed(f"SDTRAIN_FILE logs/rank0.log {index} 2000000000 ")
    assert receiver.notes == [] and len(receiver.parts["logs/rank0.log"].chunks) == fits
    receiver.feed(f"SDTRAIN_FILE logs/rank0.log {fits} 2000000000 ")
    assert receiver.notes[0].startswith("logs/rank0.log: more than 1 MiB of chunks waiting")
    assert receiver.parts == {} and receiver.pending_bytes == 0


def test_a_node_speaks_for_itself_only(tmp_path, capfd):
    """Over real processes: node 1 forges node 0's failure report (file and line), rank 0's
    log and the metrics; none is taken, each is shown under node 1's name, and node 1's own
    report and log arrive."""
    forged = json.dumps(report(0, 0, "RuntimeError: forged"))
    lines = [*file_lines(tmp_path, "failures/node0.json", forged), *file_lines(tmp_path, "logs/rank0.log", "forged\n"),
             *file_lines(tmp_path, "metrics.jsonl", '{"step": 999}\n'), REPORT_PREFIX + forged,
             REPORT_PREFIX + json.dumps(report(1, 0, "RuntimeError: forged rank")),
             *file_lines(tmp_path, "logs/rank2.log", "rank 2's own\n"),
             REPORT_PREFIX + json.dumps(report(1, 2, "RuntimeError: node 1's own"))]
    script = textwrap.dedent(f"""
        import sys
        for line in {lines!r}:
            print(line, file=sys.stderr)
        sys.exit(1)
    """)
    quiet = [sys.executable, "-c", "pass"]
    run_dir = tmp_path / "run"
    outcome = Supervisor([quiet, [sys.executable, "-c", script]], labels=["node 0 a", "node 1 b"], nodes=NODES,
                         run_dir=run_dir).run()
    err = capfd.readouterr().err
    assert [r["failures"][0]["error"] for r in outcome.reports] == ["RuntimeError: node 1's own"], err
    assert not (run_dir / "failures").exists() and not (run_dir / "metrics.jsonl").exists()
    assert sorted(path.name for path in (run_dir / "logs").iterdir()) == ["rank2.log"]
    assert err.count("[node 1 b] (sdtrain: a file sent back: ") == 3, err
    assert "it speaks for node 0, rank 0, and came from node 1 (ranks 2-3)" in err
    assert "it speaks for node 1, rank 0, and came from node 1 (ranks 2-3)" in err


def test_several_remote_nodes_need_the_plan():
    with pytest.raises(ValueError, match="pass the plan's nodes"):
        Supervisor([["true"], ["true"]], labels=["node 0", "node 1"])
