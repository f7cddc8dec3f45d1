"""A hung rank is found by the watchdog long before the collective timeout, every rank's stack
and last collectives are taken before anything is killed, and the launcher names the stuck
rank, its line and the collective the others wait in; nothing is left running."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, TINY, merge, sdtrain
from sdtrain.launch.hang_report import RankState, diagnose, main_thread_stack

HANG_TIMEOUT_S = 5
HUNG = {"train": {"steps": 40}, "launch": {"nproc_per_node": 2, "hang_timeout_s": HANG_TIMEOUT_S}}


def drill_line() -> str:
    """file:line of the drill's sleep, as a diagnosis names it."""
    source = (REPO / "sdtrain" / "train" / "hang_drill.py").read_text().splitlines()
    line = next(i for i, text in enumerate(source, 1) if "time.sleep(" in text)
    return f"sdtrain/train/hang_drill.py:{line} in inject_hang"


def run_watching(argv: list[str], env: dict, cwd=REPO, timeout=180, job=lambda: []) -> tuple[subprocess.CompletedProcess, list, float]:
    """Run `sdtrain ARGV`, remembering every process of the job while it runs (the launcher's
    descendants, and what `job()` finds: a remote node's are sshd's); returns the result,
    those processes and when the launcher exited (time.time())."""
    launcher = subprocess.Popen([sys.executable, "-m", "sdtrain", *map(str, argv)], cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "COLUMNS": "200", **env})
    seen, deadline = {}, time.monotonic() + timeout
    while launcher.poll() is None and time.monotonic() < deadline:
        try:
            for p in [*psutil.Process(launcher.pid).children(recursive=True), *job()]:
                seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    out, err = launcher.communicate(timeout=30)
    return subprocess.CompletedProcess(argv, launcher.returncode, out, err), list(seen.values()), time.time()


def assert_nothing_left(procs, run_dir: Path):
    workers = [r["pid"] for node in (run_dir / "hang").glob("node*.json")
               for r in json.loads(node.read_text())["ranks"].values()]
    assert workers and set(workers) <= {p.pid for p in procs}  # the check below covers them
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"


def hang_began(run_dir: Path, rank: int) -> float:
    """When the hung rank made its last progress (it began the step it hangs in)."""
    for node in (run_dir / "hang").glob("node*.json"):
        ranks = json.loads(node.read_text())["ranks"]
        if str(rank) in ranks:
            return ranks[str(rank)]["progress_at"]
    raise AssertionError(f"rank {rank} is in no hang report")


def test_hung_rank_is_named_with_its_line_and_the_waiting_collective(write_recipe, tmp_path):
    run_dir = tmp_path / "run"
    result, procs, ended = run_watching(["launch", write_recipe(HUNG), "--run-dir", run_dir],
                                        {"SDTRAIN_INJECT_HANG": "1:3", "OMP_NUM_THREADS": "1"})
    err = result.stderr
    assert result.returncode == 1, result.stdout + err
    assert f"root cause: hang: rank 1 stuck at {drill_line()} while the others wait in all_reduce" in err, err
    assert "likely culprit: rank 1" in err and "which rank 0 waits in" in err
    assert "(injected)" in err and "injected by SDTRAIN_INJECT_HANG=1:3" in err  # a drill's hang never reads as a real one
    assert "rank 0: waiting in all_reduce" in err
    assert ended - hang_began(run_dir, 1) < HANG_TIMEOUT_S + 15
    stacks = (run_dir / "hang" / "rank1.txt").read_text()
    assert 'sdtrain/train/hang_drill.py", line' in stacks and "in inject_hang" in stacks  # the full stacks
    assert "OPEN" in (run_dir / "hang" / "rank0.txt").read_text()  # rank 0's open all-reduce
    assert_nothing_left(procs, run_dir)


def test_hang_timeout_must_be_positive(write_recipe):
    result = sdtrain("launch", write_recipe(), "--dry-run", "--set", "launch.hang_timeout_s=0")
    assert result.returncode == 2 and "launch.hang_timeout_s" in result.stderr and "greater than 0" in result.stderr


# The diagnosis on its own, from what watchdogs report (no processes).

def collective(seq, group_seq, op="all_reduce", group="dp[0, 1, 2, 3]", completed=True, ranks=(0, 1, 2, 3)):
    return {"seq": seq, "group_seq": group_seq, "op": op, "group": group, "ranks": list(ranks), "bytes": 1024,
            "entered": 1.0, "completed": 2.0 if completed else None}


def frame_stack(*frames):
    return [(f"/x/sdtrain/{path}", line, fn) for path, line, fn in frames]


def test_the_rank_behind_in_the_group_is_the_culprit_even_inside_another_collective():
    """Ranks 0, 1, 3 wait in all_reduce #5 of their group; rank 2 is stuck in an all_gather on
    another group (waiting too, but for something else): rank 2 never entered #5."""
    waiting = [collective(i, i) for i in range(1, 5)] + [collective(5, 5, completed=False)]
    ranks = {r: RankState(rank=r, collectives=waiting, stack=frame_stack(("parallel/zero.py", 206, "step"))) for r in (0, 1, 3)}
    ranks[2] = RankState(rank=2, collectives=[collective(i, i) for i in range(1, 5)]
                         + [collective(5, 1, op="all_gather", group="pp[2, 3]", completed=False, ranks=(2, 3))],
                         stack=frame_stack(("parallel/zero3.py", 52, "gather")))
    cause, lines = diagnose(ranks, [{"timeout_s": 5, "stalled": {"0": 6.0}}], world_size=4)
    assert cause.startswith("hang: rank 2 stuck at sdtrain/parallel/zero3.py:52 in gather while the others wait in all_reduce #5")
    assert any(line.startswith("likely culprit: rank 2") and "which ranks 0, 1, 3 wait in" in line for line in lines)


def test_a_rank_that_never_reported_is_named():
    ranks = {0: RankState(rank=0, collectives=[collective(1, 1, group="world[0, 1]", ranks=(0, 1), completed=False)])}
    cause, lines = diagnose(ranks, [{"timeout_s": 5}], world_size=2)
    assert cause.startswith("hang: rank 1 stuck")
    assert any("rank 1 never entered all_reduce #1" in line and "sent no stack" in line for line in lines)


def test_main_thread_is_picked_out_of_a_faulthandler_dump():
    dump = ('Thread 0x00007f99b7cff6c0 (most recent call first):\n  File "/x/progress.py", line 69 in _beat\n\n'
            'Current thread 0x00007f99d9e85b80 (most recent call first):\n  File "/x/sdtrain/train/hang_drill.py", '
            'line 16 in inject_hang\n  File "/x/sdtrain/train/trainer.py", line 80 in train_step\n')
    stack = main_thread_stack(dump, 0x7F99D9E85B80)
    assert stack[0] == ("/x/sdtrain/train/hang_drill.py", 16, "inject_hang") and len(stack) == 2
    assert RankState(rank=1, stack=stack).where == "sdtrain/train/hang_drill.py:16 in inject_hang"


@pytest.mark.slow
def test_a_hang_restarts_under_max_restarts(write_recipe, tmp_path):
    """The hang is a failure like any other: with max_restarts 1 the job resumes from its
    checkpoint and finishes; the diagnosis of the first attempt stays in hang/."""
    run_dir = tmp_path / "run"
    recipe = write_recipe(merge(HUNG, {"train": {"steps": 8}, "launch": {"max_restarts": 1},
                                       "checkpoint": {"every": 2, "at_end": True}}))
    result = sdtrain("launch", recipe, "--run-dir", run_dir, env={"SDTRAIN_INJECT_HANG": "1:3@0", "OMP_NUM_THREADS": "1"},
                     timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"restart 1/1 after a failure of attempt 0: stopped by the hang watchdog: hang: rank 1 stuck at {drill_line()}" \
        in " ".join(result.stderr.split()), result.stderr
    assert (run_dir / "hang" / "diagnosis.txt").read_text().startswith(f"hang: rank 1 stuck at {drill_line()}")
    [record] = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert record["cause"]["error"].endswith("(injected by SDTRAIN_INJECT_HANG=1:3@0)")  # the drill's, not a real hang


@pytest.mark.slow
def test_a_node_without_the_shared_run_dir_sends_its_hang_report(tmp_path, monkeypatch):
    """A remote node agent in a directory the launcher never prepared sends hang/node0.json
    back as file lines on stderr; the launcher's diagnosis is made from what arrived."""
    from test_remote_agent import agent

    from sdtrain.launch.collect import FileReceiver
    from sdtrain.launch.hang_report import hang_diagnosis

    monkeypatch.setenv("SDTRAIN_INJECT_HANG", "0:2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    recipe = merge(TINY, {"train": {"steps": 20}, "launch": {"hang_timeout_s": HANG_TIMEOUT_S}})
    result = agent(tmp_path, json.loads(json.dumps(recipe)), nnodes=1)
    assert result.returncode == 1, result.stderr
    receiver = FileReceiver(tmp_path / "launcher-run")
    for line in result.stderr.splitlines():
        receiver.feed(line)
    cause, lines = hang_diagnosis(tmp_path / "launcher-run", world_size=1)
    assert cause == f"hang: rank 0 stuck at {drill_line()}", cause
    assert '"hang": {' in result.stderr  # the node's failure report names the hang
    assert (tmp_path / "launcher-run" / "hang" / "rank0.txt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("layout, drill, culprit, waiting", [
    # on gloo ZeRO-3 gathers by a ring of point-to-point exchanges (parallel/ring.py)
    ({"parallel": {"zero_stage": 3}}, "1:2", 1, "rank 0: waiting in irecv #"),
    ({"parallel": {"pipeline": {"stages": 2, "schedule": "1f1b"}}, "train": {"grad_accum_steps": 4}}, "0:3", 0,
     "rank 1: waiting in irecv #"),
])
def test_hang_under_zero3_and_a_pipeline(write_recipe, tmp_path, layout, drill, culprit, waiting):
    """ZeRO-3's prefetched all-gathers and a pipeline's point-to-point receives: the rank that
    never came is named, and what its peer waits in."""
    run_dir = tmp_path / "run"
    recipe = merge(merge(HUNG, layout), {"train": {"global_batch_size": 8, "micro_batch_size": 2}})
    result = sdtrain("launch", write_recipe(recipe), "--run-dir", run_dir,
                     env={"SDTRAIN_INJECT_HANG": drill, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"root cause: hang: rank {culprit} stuck at {drill_line()}" in result.stderr, result.stderr
    assert waiting in " ".join(result.stderr.split()) and f"likely culprit: rank {culprit}" in result.stderr
