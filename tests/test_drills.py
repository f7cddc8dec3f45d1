"""A drill's failure never reads as a real one: the launch says a drill is active, and the
failure report says "injected" instead of advice for a cause that is not there."""

import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from conftest import sdtrain
from sdtrain.errors import UserInputError
from sdtrain.launch.drills import ActiveDrill, hang_injected, injected_by
from sdtrain.launch.failures import REPORT_PREFIX
from sdtrain.launch.supervise import Supervisor
from sdtrain.train.faults import check_drills
from sdtrain.train.nonfinite import NonFiniteError, StepGuard
from sdtrain.train.preempt import PreemptRequest


def guard(tmp_path, policy="stop", max_skipped=0):
    env = SimpleNamespace(world_size=1, rank=0, device=torch.device("cpu"))
    return StepGuard(env, policy, max_skipped, check_norm=True, preempt=PreemptRequest(tmp_path, enabled=False))


def nan_at(g, step):
    g.begin(step, torch.tensor(float("nan")))
    return g(torch.tensor(float("nan")))


def test_a_planted_nan_is_called_injected_not_a_divergence(tmp_path, monkeypatch):
    """Reproduction: SDTRAIN_INJECT_NAN made the report advise "Lower train.lr"."""
    monkeypatch.setenv("SDTRAIN_INJECT_NAN", "0:4")
    with pytest.raises(NonFiniteError) as err:
        nan_at(guard(tmp_path), 4)
    message = str(err.value)
    assert "at step 5, injected by SDTRAIN_INJECT_NAN=0:4 (a drill, not a divergence)" in message
    assert "train.lr" not in message and "Unset SDTRAIN_INJECT_NAN" in message


def test_a_real_nan_keeps_its_advice_while_a_drill_waits_for_another_step(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_INJECT_NAN", "0:9")
    with pytest.raises(NonFiniteError) as err:
        nan_at(guard(tmp_path), 4)
    assert "injected" not in str(err.value) and "Lower train.lr" in str(err.value)


def test_skip_mode_does_not_call_the_drill_a_divergence(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAIN_INJECT_NAN", "0:2,0:3")
    g = guard(tmp_path, policy="skip", max_skipped=1)
    assert nan_at(g, 2) is False
    with pytest.raises(NonFiniteError) as err:
        nan_at(g, 3)
    assert "2 updates skipped in a row" in str(err.value) and "diverged" not in str(err.value)


def test_a_misspelt_drill_is_refused():
    with pytest.raises(UserInputError, match="SDTRAIN_INJECT_FAUL is no drill sdtrain knows"):
        check_drills({"SDTRAIN_INJECT_FAUL": "0:1"})
    check_drills({"SDTRAIN_INJECT_FAUL": ""})  # set but empty: no drill


FAULT = ActiveDrill("SDTRAIN_INJECT_FAULT", "1:3", "the launcher's environment")
LIMIT = ActiveDrill("SDTRAIN_INJECT_ADDRESS_LIMIT", "1:524288000", "/x/.sdtrain_env")
HANG = ActiveDrill("SDTRAIN_INJECT_HANG", "3:3", "/x/.sdtrain_env")


def test_which_failure_a_drill_caused():
    raised = {"rank": 1, "error": "RuntimeError: fault injected by SDTRAIN_INJECT_FAULT=1:3 (rank 1, step 3)", "traceback": ""}
    assert injected_by(raised, [LIMIT, FAULT]) is FAULT
    assert injected_by({"rank": 0, "error": "RuntimeError: boom", "traceback": ""}, [FAULT]) is None
    assert injected_by({"rank": 1, "error": "", "traceback": "", "oom": {"certain": True}}, [LIMIT]) is LIMIT
    assert injected_by({"rank": 0, "error": "", "traceback": "", "oom": {"certain": True}}, [LIMIT]) is None
    assert hang_injected("hang: rank 3 stuck at sdtrain/train/hang_drill.py:19 in inject_hang", [], [HANG]) is HANG
    assert hang_injected("hang: rank 3 stuck at sdtrain/model/gpt.py:80 in forward", [], [HANG]) is None


def report_of(error: str) -> str:
    return REPORT_PREFIX + json.dumps({"node_rank": 0, "failures": [
        {"rank": 1, "local_rank": 1, "host": "h", "pid": 7, "exitcode": 1, "exit": "exit code 1", "timestamp": 1.0,
         "error": error, "traceback": "Traceback ...\n" + error, "log_tail": ""}]})


@pytest.mark.parametrize("error, says", [
    ("RuntimeError: fault injected by SDTRAIN_INJECT_FAULT=1:3 (rank 1, step 3, attempt 0)",
     "root cause: rank 1 on h (local rank 1, pid 7) exit code 1 (injected)"),
    ("RuntimeError: boom", "note: drill(s) active (SDTRAIN_INJECT_FAULT=1:3), but this failure does not look like their doing"),
])
def test_the_failure_report_says_injected_or_that_it_was_not(tmp_path, write_recipe, monkeypatch, error, says):
    from sdtrain.launch.job import plan_job
    from sdtrain.launch.report import print_failure

    monkeypatch.setenv("SDTRAIN_INJECT_FAULT", "1:3")
    run_dir = tmp_path / "run"
    job = plan_job(str(write_recipe()), [], 1, str(run_dir))
    assert job.drills == [FAULT]
    script = f"import sys; print({report_of(error)!r}, file=sys.stderr); sys.exit(1)"
    outcome = Supervisor([[sys.executable, "-c", script]], labels=["node 0 test"], run_dir=run_dir).run()
    out = io.StringIO()
    print_failure(Console(file=out, width=300), job, outcome)
    assert says in out.getvalue()
    injected = "injected by SDTRAIN_INJECT_FAULT=1:3 (from the launcher's environment): a drill, not a real failure"
    assert (injected in out.getvalue()) == ("fault injected" in error)


def test_a_nan_drill_run_reports_injected_not_lower_lr(write_recipe, tmp_path):
    """The whole path, one worker: banner at launch, "injected" in the root cause, no lr advice."""
    recipe = write_recipe({"train": {"steps": 3}})
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", env={"SDTRAIN_INJECT_NAN": "0:1"}, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    err = " ".join(result.stderr.split())
    assert "fault-injection drill active" in err and "SDTRAIN_INJECT_NAN=0:1 (from the launcher's environment)" in err
    assert "exit code 1 (injected)" in err and "injected by SDTRAIN_INJECT_NAN=0:1 (from the launcher's environment)" in err
    assert "at step 2, injected by SDTRAIN_INJECT_NAN=0:1 (a drill, not a divergence)" in err
    assert "Lower train.lr" not in err


def hang_report(run_dir, file: str, function: str) -> None:
    """hang/node0.json as the watchdog writes it: rank 0 waits in an all_reduce that rank 1,
    asleep in `function` of `file`, never entered."""
    waiting = {"seq": 1, "group_seq": 1, "op": "all_reduce", "group": "world[0, 1]", "ranks": [0, 1], "bytes": 4,
               "entered": 1.0, "completed": None}
    stack = f'Current thread 0x0000000000000001 (most recent call first):\n  File "/x/{file}", line 19 in {function}\n'
    (run_dir / "hang").mkdir(parents=True)
    (run_dir / "hang" / "node0.json").write_text(json.dumps({"node_rank": 0, "timeout_s": 5, "ranks": {
        "0": {"recent": [waiting], "step": 3}, "1": {"recent": [], "step": 3, "stacks": stack, "main_thread": 1}}}))


@pytest.mark.parametrize("file, function, injected", [("sdtrain/train/hang_drill.py", "inject_hang", True),
                                                     ("sdtrain/model/gpt.py", "forward", False)])
def test_a_restart_after_a_drill_hang_says_injected(tmp_path, write_recipe, monkeypatch, file, function, injected):
    """The restart line, restarts.jsonl and summary.json's causes say "injected" for a hang the
    drill caused, as a fault's or a NaN's error text does; a real hang under a drill does not."""
    from sdtrain.launch.job import plan_job
    from sdtrain.launch.restarts import describe_cause, failure_cause
    from sdtrain.launch.supervise import JobOutcome

    monkeypatch.setenv("SDTRAIN_INJECT_HANG", "1:3@0")
    run_dir = tmp_path / "run"
    job = plan_job(str(write_recipe({"launch": {"nproc_per_node": 2}})), [], 2, str(run_dir))
    hang_report(run_dir, file, function)
    killed = {"rank": 1, "local_rank": 1, "host": "h", "pid": 7, "exitcode": -9, "exit": "signal SIGKILL",
              "timestamp": 1.0, "error": "", "traceback": "", "log_tail": ""}
    outcome = JobOutcome(exit_codes=[1], interrupted=None, wall_s=1.0,
                         reports=[{"node_rank": 0, "hang": True, "failures": [killed]}])
    line = describe_cause(failure_cause(job, outcome))
    assert line.startswith("stopped by the hang watchdog: hang: rank 1 stuck at sdtrain/"), line
    assert ("(injected by SDTRAIN_INJECT_HANG=1:3@0)" in line) == injected, line


def test_a_restart_after_an_address_limit_drill_says_injected(tmp_path, write_recipe, monkeypatch):
    """The address-space drill shows as an out-of-memory error that names no drill itself."""
    from sdtrain.launch.job import plan_job
    from sdtrain.launch.restarts import describe_cause, failure_cause
    from sdtrain.launch.supervise import JobOutcome

    monkeypatch.setenv("SDTRAIN_INJECT_ADDRESS_LIMIT", "0:524288000")
    job = plan_job(str(write_recipe()), [], 1, str(tmp_path / "run"))
    oom = {"rank": 0, "local_rank": 0, "host": "h", "pid": 7, "exitcode": 1, "exit": "exit code 1", "timestamp": 1.0,
           "error": "MemoryError", "traceback": "", "log_tail": "", "oom": {"certain": True}}
    outcome = JobOutcome(exit_codes=[1], interrupted=None, wall_s=1.0, reports=[{"node_rank": 0, "failures": [oom]}])
    assert describe_cause(failure_cause(job, outcome)).endswith(
        "MemoryError (injected by SDTRAIN_INJECT_ADDRESS_LIMIT=0:524288000)")


def test_the_drills_of_launches_from_here_are_the_environments_and_the_files(tmp_path, monkeypatch):
    """What a bench's entries would run with, checked as the launch checks it."""
    from sdtrain.launch.drills import drills_of_launches_from_here

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".sdtrain_env").write_text("SDTRAIN_INJECT_FAULT=0:2\n")
    with pytest.raises(UserInputError, match="--allow-env-file-var SDTRAIN_INJECT_FAULT"):
        drills_of_launches_from_here({})
    drills = drills_of_launches_from_here({"SDTRAIN_INJECT_NAN": "1:3"}, allowed=["SDTRAIN_INJECT_FAULT"])
    assert [str(d) for d in drills] == ["SDTRAIN_INJECT_FAULT=0:2 (from " + str(tmp_path / ".sdtrain_env") + ")",
                                        "SDTRAIN_INJECT_NAN=1:3 (from the launcher's environment)"]
    with pytest.raises(UserInputError):  # a malformed drill: every launch would refuse it
        drills_of_launches_from_here({"SDTRAIN_INJECT_NAN": "rank0"}, allowed=["SDTRAIN_INJECT_FAULT"])
