"""Operations (issue 10): automatic restart and resume, the non-finite loss policy,
preemption, and their bad input. Real launches on gloo, checked against the uninterrupted
run of the same recipe (conftest's full_run: 10 steps on 2 workers, checkpoints every 5).

In `make test`: the restart drill (one launch, two attempts) and the bad input (nothing
launched). The rest is `slow`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import REPO, RESUMABLE, TINY, merge, metrics, sdtrain
from sdtrain.errors import RecipeError
from sdtrain.recipe import validate_recipe
from sdtrain.train.faults import parse_drill
from sdtrain.train.preempt import PREEMPTED_EXIT


def words(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def trajectory(run_dir):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(run_dir)]


def write(tmp_path, recipe: dict, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch_with_faults(full_run, tmp_path, faults: str, code: int):
    """full_run's recipe with max_restarts 1 and SDTRAIN_INJECT_FAULT=faults; exit `code`."""
    recipe, _ = full_run
    run_dir = tmp_path / "run"
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--set", "launch.max_restarts=1",
                     env={"SDTRAIN_INJECT_FAULT": faults, "OMP_NUM_THREADS": "1"})
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, words(result.stderr)


def test_fault_restarts_from_the_checkpoint_on_the_same_trajectory(full_run, tmp_path):
    """Rank 1 raises at step 7 of attempt 0; the job restarts from step 5's checkpoint and
    ends exit 0 with the uninterrupted run's losses, bitwise (fp32 CPU)."""
    _, reference = full_run
    run_dir, err = launch_with_faults(full_run, tmp_path, "1:7", 0)
    assert "restart 1/1 after a failure of attempt 0: rank 1 on" in err and "SDTRAIN_INJECT_FAULT=1:7" in err
    assert f"resuming from {run_dir / 'checkpoints' / 'step_5'}" in err
    assert trajectory(run_dir) == trajectory(reference)
    [record] = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert record["attempt"] == 1 and record["resume_step"] == 5 and record["cause"]["rank"] == 1
    assert "attempt 0" in record["cause"]["error"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and "SDTRAIN_INJECT_FAULT=1:7" in summary["restart_causes"][0]
    assert (run_dir / "failures" / "attempt0" / "node0.json").exists()


@pytest.mark.parametrize("section, expected", [
    ({"launch": {"max_restarts": -1}}, "launch.max_restarts: Input should be greater than or equal to 0"),
    ({"launch": {"max_restarts": 101}}, "launch.max_restarts: Input should be less than or equal to 100"),
    ({"checkpoint": {"on_preempt": True, "at_end": False}},
     "on_preempt saves a checkpoint to resume from, but checkpointing is off (every 0, at_end false)"),
    ({"train": {"on_nonfinite": "retry"}}, "train.on_nonfinite: Input should be 'stop' or 'skip'"),
    ({"train": {"max_skipped_steps": -1}}, "train.max_skipped_steps: Input should be greater than or equal to 0"),
])
def test_operations_recipe_keys_refuse_bad_values(section, expected):
    with pytest.raises(RecipeError) as error:
        validate_recipe(merge(TINY, section))
    assert expected in str(error.value)


def test_a_malformed_drill_is_refused_before_launch(write_recipe, tmp_path):
    result = sdtrain("launch", write_recipe(), "--run-dir", tmp_path / "run", env={"SDTRAIN_INJECT_FAULT": "1:7@0,1:x"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SDTRAIN_INJECT_FAULT=1:7@0,1:x: '1:x' is not RANK:STEP[@ATTEMPT]" in words(result.stderr)
    assert not (tmp_path / "run").exists()
    assert parse_drill("D", "1:7, 0:3@2") == [(1, 7, 0), (0, 3, 2)]
    result = sdtrain("launch", write_recipe(), "--run-dir", tmp_path / "run",
                     env={"SDTRAIN_INJECT_ADDRESS_LIMIT": "1:5e8"})  # a worker used to die on it
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SDTRAIN_INJECT_ADDRESS_LIMIT=1:5e8: not RANK:BYTES" in words(result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_restart_never_takes_a_checkpoint_the_launch_refused(full_run, tmp_path):
    """Issue 19's reproduction: step_10's shard is a link to a file outside its folder, with
    the same bytes, so its manifest matches. The launch (train.resume auto) refuses it and
    resumes from step_5; after a fault, the restart used to check manifests only and took
    step_10, reading the file outside. Now it skips it as refused earlier in the job."""
    import shutil

    recipe, reference = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard, outside = run_dir / "checkpoints" / "step_10" / "__1_0.distcp", tmp_path / "elsewhere.distcp"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    step_5 = run_dir / "checkpoints" / "step_5"
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--set", "train.resume=auto", "--set", "train.steps=12",
                     "--set", "launch.max_restarts=1", env={"SDTRAIN_INJECT_FAULT": "1:7", "OMP_NUM_THREADS": "1"})
    out, err = words(result.stdout), words(result.stderr)
    assert result.returncode == 0, out[-3000:] + err[-3000:]
    assert f"skipped checkpoint step_10: {shard} is a link to {str(outside)!r}, outside the checkpoint folder" in err
    assert f"resuming from {step_5}" in out
    assert "restart 1/1 after a failure of attempt 0: rank 1 on" in err and "back-off 1 s" in err
    assert "note: skipped checkpoint step_10: refused earlier in this job" in err
    assert f"restart 1: resuming from {step_5}" in err
    [record] = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert record["resume_step"] == 5 and record["backoff_s"] == 1.0


def test_a_restart_target_passes_what_the_launch_checks(full_run, tmp_path):
    """restart_target on a real planned job (nothing started): a checkpoint of another model
    is skipped as the launch would refuse it, and a job that resumed from a checkpoint that no
    longer verifies is not restarted from step 0 (that would drop the weights it continued)."""
    import shutil

    from sdtrain.launch.job import plan_job
    from sdtrain.launch.resume_target import restart_target
    from sdtrain.train.checkpoint_manifest import MANIFEST

    recipe, reference = full_run
    external = tmp_path / "elsewhere" / "step_5"
    shutil.copytree(reference / "checkpoints" / "step_5", external)
    job = plan_job(str(recipe), [f"train.resume={external}", "train.steps=20"], 2, str(tmp_path / "run"))
    assert job.resume_from == external and restart_target(job) == (external, [], True)

    other = job.run_dir / "checkpoints" / "step_10"  # as if another model's run had saved here
    shutil.copytree(reference / "checkpoints" / "step_10", other)
    info = json.loads((other / "sdtrain.json").read_text())
    info["model"]["n_heads"] = 4
    (other / "sdtrain.json").write_text(json.dumps(info))
    (other / MANIFEST).unlink()
    target, skipped, go_on = restart_target(job)
    assert (target, go_on) == (external, True)
    assert skipped == [f"skipped checkpoint step_10: checkpoint {other} holds a different model "
                       "(n_heads: checkpoint 4 vs recipe 2); resume needs the same model shape"]

    shard = external / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    target, skipped, go_on = restart_target(job)
    assert (target, go_on) == (None, False) and "refused earlier in this job" in skipped[0]
    assert skipped[1].startswith(f"skipped checkpoint step_5: {shard} has") and "truncated" in skipped[1]


def test_restarts_back_off_doubling_up_to_a_minute():
    from sdtrain.launch.restarts import backoff_s

    assert [backoff_s(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]


@pytest.mark.slow
def test_two_faults_exhaust_one_restart_and_both_are_named(full_run, tmp_path):
    run_dir, err = launch_with_faults(full_run, tmp_path, "1:7@0,0:6@1", 1)
    assert "the job failed 2 times (launch.max_restarts 1)" in err
    assert "attempt 0: rank 1 on" in err and "(rank 1, step 7, attempt 0)" in err
    assert "attempt 1: rank 0 on" in err and "(rank 0, step 6, attempt 1)" in err
    assert len((run_dir / "restarts.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_fault_before_any_checkpoint_restarts_from_step_0(full_run, tmp_path):
    _, reference = full_run
    run_dir, err = launch_with_faults(full_run, tmp_path, "0:3", 0)
    assert "no checkpoint yet: starting over from step 0" in err
    assert trajectory(run_dir) == trajectory(reference)


NAN_RUN = merge(TINY, {"train": {"steps": 8}, "launch": {"nproc_per_node": 2}, "checkpoint": {"every": 3}})


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_nonfinite_loss_stops_naming_step_and_rank(tmp_path, zero_stage):
    """An injected NaN in rank 1's loss at step index 4: exit 1 naming step 5, rank 1 and
    the loss; checkpoint step_3 stays the latest, and no step 5 in metrics."""
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write(tmp_path, NAN_RUN), "--run-dir", run_dir,
                     "--set", f"parallel.zero_stage={zero_stage}", env={"SDTRAIN_INJECT_NAN": "1:4"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NonFiniteError: non-finite loss on rank(s) 1; gradient norm (nan) on rank(s) 0, 1 at step 5" in words(result.stderr)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_3"
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_huge_lr_stops_with_nonfinite(tmp_path):
    run_dir = tmp_path / "run"
    result = sdtrain("launch", write(tmp_path, NAN_RUN), "--run-dir", run_dir, "--set", "train.lr=1.0e+6",
                     "--set", "train.grad_clip=0.0")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NonFiniteError: non-finite" in result.stderr and "train.on_nonfinite is stop" in words(result.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.zero_stage=0"],
    ["parallel.zero_stage=2"],
    ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=1f1b", "train.grad_accum_steps=2"],
])
def test_skip_mode_skips_on_every_rank_alike(tmp_path, layout):
    """NaNs at step indexes 2 and 5 on one rank: both updates skipped everywhere, counted
    in metrics and summary; every replica ends with the same weights (SDTRAIN_DUMP_WEIGHTS:
    each rank logs a digest of its weights; one digest per pipeline stage)."""
    recipe = merge(NAN_RUN, {"train": {"on_nonfinite": "skip", "max_skipped_steps": 1},
                             "checkpoint": {"every": 0, "at_end": True}})
    run_dir = tmp_path / "run"
    args = [a for item in layout for a in ("--set", item)]
    if "parallel.pipeline.stages=2" in layout:
        recipe["launch"]["nproc_per_node"] = 4
        recipe["train"].pop("micro_batch_size")
    last = recipe["launch"]["nproc_per_node"] - 1  # a rank of the last stage, where the loss is
    result = sdtrain("launch", write(tmp_path, recipe), "--run-dir", run_dir, *args,
                     env={"SDTRAIN_INJECT_NAN": f"{last}:2,{last}:5", "SDTRAIN_DUMP_WEIGHTS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 2
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in range(recipe["launch"]["nproc_per_node"])]
    assert all("skipped the update of step 3" in log and "skipped the update of step 6" in log for log in logs)
    digests = {line.split("weights digest ")[1] for log in logs for line in log.splitlines() if "weights digest " in line}
    stages = 2 if "parallel.pipeline.stages=2" in layout else 1
    assert len(digests) == stages and len({d.split(":")[0] for d in digests}) == stages, digests


@pytest.mark.slow
def test_skip_mode_stops_after_too_many_in_a_row(tmp_path):
    recipe = merge(NAN_RUN, {"train": {"on_nonfinite": "skip", "max_skipped_steps": 1}})
    result = sdtrain("launch", write(tmp_path, recipe), "--run-dir", tmp_path / "run",
                     env={"SDTRAIN_INJECT_NAN": "0:2,0:3"})
    assert result.returncode == 1
    assert "2 updates skipped in a row, more than train.max_skipped_steps 1" in words(result.stderr)


PREEMPTIBLE = merge(TINY, RESUMABLE)


@pytest.mark.slow
def test_preemption_checkpoints_exits_3_and_the_relaunch_resumes(full_run, tmp_path):
    """SIGTERM to the launcher mid-run: the workers finish their step, save a checkpoint
    there, the launcher exits 3; launching again resumes on the uninterrupted trajectory."""
    _, reference = full_run
    recipe = write(tmp_path, merge(PREEMPTIBLE, {"checkpoint": {"on_preempt": True}}))
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "sdtrain", "launch", str(recipe), "--run-dir", str(run_dir)]
    launcher = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "200"})
    # The workers have started (setup takes seconds, the 10 steps a fraction of one): the
    # request is there before their first step ends, wherever exactly the signal lands.
    deadline = time.monotonic() + 120
    while not (run_dir / "logs" / "rank1.log").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == PREEMPTED_EXIT, out[-2000:] + err[-2000:]
    stopped = json.loads((run_dir / "preempted.json").read_text())
    assert 1 <= stopped["step"] < 10 and (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped['step']}"
    assert f"preempted: stopped after step {stopped['step']}" in words(err)
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert trajectory(run_dir) == trajectory(reference)
    assert not (run_dir / "preempted.json").exists()


def test_weights_digest_helper_is_order_independent():
    """The digest the skip test compares: the same weights give the same text."""
    from sdtrain.train.faults import weights_digest

    weights = {"a": torch.ones(3), "b": torch.arange(4.0)}
    assert weights_digest(weights) == weights_digest(dict(reversed(list(weights.items()))))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "remove", "flip-byte"])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(full_run, tmp_path, damage):
    """step_10 damaged, its `latest` pointing at it: train.resume auto names it, skips it,
    and goes on from step_5 on the uninterrupted trajectory (train.steps raised to 10 + 0:
    the same 10 steps, replayed from 5)."""
    import shutil

    recipe, reference = full_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = run_dir / "checkpoints" / "step_10" / "__1_0.distcp"
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "remove":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x01
        shard.write_bytes(bytes(data))
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skipped checkpoint step_10: {shard}" in words(result.stderr)
    assert f"resuming from {run_dir / 'checkpoints' / 'step_5'}" in words(result.stdout)
    assert trajectory(run_dir) == trajectory(reference)


@pytest.mark.slow
def test_async_save_writes_the_same_checkpoints(full_run, tmp_path):
    """checkpoint.async_save: the same trajectory; its step_5 verifies, and a resume from it
    ends on the uninterrupted run's losses (the staged copy is step 5's state, not a later one)."""
    from conftest import crashed_copy
    from sdtrain.train.checkpoint_verify import checkpoint_problems

    recipe, reference = full_run
    run_dir = tmp_path / "run"
    result = sdtrain("launch", recipe, "--run-dir", run_dir, "--set", "checkpoint.async_save=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert trajectory(run_dir) == trajectory(reference)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_10"
    assert checkpoint_problems(run_dir / "checkpoints" / "step_5") == []
    assert len(json.loads((run_dir / "summary.json").read_text())["checkpoint_stall_s"]) == 2
    resumed = crashed_copy(run_dir, tmp_path / "resumed")
    result = sdtrain("launch", recipe, "--run-dir", resumed, "--set", "train.resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert trajectory(resumed) == trajectory(reference)
