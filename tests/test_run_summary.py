"""The end-of-run summary and the step lines, from a real run (restarted once within its job)
and from its resume on another number of ranks: the eval line spans the whole run from its
step-0 baseline, the rank count, throughput and means say which launch they cover, and nothing
is wider than an 80-column terminal."""

import json

import pytest

from conftest import TINY, merge, metrics, sdtrain

# Expert parallel over the 2 ranks, so the first launch logs an all-to-all share and its resume
# on 1 rank (no all-to-all there) shows whether the summary mixes the two launches.
RUN = merge(TINY, {"model": {"moe": {"num_experts": 2, "top_k": 1, "every_n_layers": 2}},
                   "parallel": {"expert_parallel": 2},
                   "train": {"steps": 4, "eval_every": 2}, "launch": {"nproc_per_node": 2, "max_restarts": 1},
                   "checkpoint": {"every": 2, "at_end": True}, "log": {"every": 2}})


@pytest.mark.slow
def test_a_resumed_runs_summary_covers_the_whole_run(write_recipe, tmp_path):
    recipe, run_dir = write_recipe(RUN), tmp_path / "run"
    # rank 1 fails at step 3 of the first attempt: the job restarts from step 2's checkpoint,
    # and the attempt that computed the step-0 eval wrote no summary
    first = sdtrain("launch", recipe, "--run-dir", run_dir,
                    env={"COLUMNS": "80", "OMP_NUM_THREADS": "1", "SDTRAIN_INJECT_FAULT": "1:3"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "restart 1/1" in first.stderr + first.stdout
    assert "step 2/4: loss " in first.stdout and " lr " in first.stdout and " gnorm " in first.stdout
    assert " s/step" in first.stdout and " tok/s" in first.stdout
    assert all("step_s" in row for row in metrics(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [step for step, _ in summary["eval_losses"]] == [0, 2, 4], summary["eval_losses"]
    assert summary["first_step"] == 2 and "moe_all_to_all_share" in summary["means"]
    text = " ".join(first.stdout.split())
    assert "(step 0) -> " in text and "at step 2: speed, time and means are of steps 3-4" in text, first.stdout

    second = sdtrain("launch", recipe, "--run-dir", run_dir, "--nproc-per-node", "1", "--set", "train.steps=6",
                     "--set", "parallel.expert_parallel=1", "--set", "train.resume=auto",
                     env={"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # metrics.jsonl keeps the first launch's evals (steps 2 and 4), the checkpoint the baseline at step 0
    assert [step for step, _ in summary["eval_losses"]] == [0, 2, 4, 6], summary["eval_losses"]
    assert summary["world_size"] == 1 and summary["first_step"] == 4
    # the means are this launch's alone: its step times, and no all-to-all (1 rank has none)
    this_launch = [row["step_s"] for row in metrics(run_dir) if row["step"] > 4]
    assert summary["means"]["step_s"] == round(sum(this_launch) / len(this_launch), 4), summary["means"]
    assert "moe_all_to_all_share" not in summary["means"] and "moe_dropped" in summary["means"]
    text = " ".join(second.stdout.split())
    assert "at step 4: speed, time and means are of steps 5-6" in text and " on 1 rank " in text, second.stdout
    assert "(step 0) -> " in text and "(step 6)" in text and "all-to-all share" not in text
    for line in (first.stdout + second.stdout).splitlines():
        assert len(line) <= 80 and "…" not in line, line


def test_whole_run_evals_put_the_earlier_launches_first():
    from sdtrain.train.summary import whole_run_evals

    history = [{"step": 2, "loss": 4.0, "eval_loss": 3.9}, {"step": 3, "loss": 3.8}, {"step": 4, "eval_loss": None}]
    assert whole_run_evals(history, [(6, 3.1)]) == [(2, 3.9), (6, 3.1)]  # a null (non-finite) eval is no point
    assert whole_run_evals([], [(0, 5.3), (6, 3.1)]) == [(0, 5.3), (6, 3.1)]
    assert whole_run_evals(history, [(6, 3.1)], 5.3) == [(0, 5.3), (2, 3.9), (6, 3.1)]


def test_a_checkpoints_baseline_is_read_as_data():
    from sdtrain.train.checkpoint import eval_baseline_in

    for value, expected in ((5.3, 5.3), (5, 5.0), (None, None), ("5.3", None), (True, None), ([5.3], None),
                            (float("nan"), None), (float("inf"), None), ({"loss": 5.3}, None)):
        assert eval_baseline_in({"step": 4, "eval_baseline": value}) == expected, value
    assert eval_baseline_in({"step": 4}) is None  # a checkpoint written before the baseline was kept


def test_run_means_of_the_shares_a_strategy_logs():
    from sdtrain.train.summary import run_means

    records = [{"step": 1, "bubble": 0.2, "step_s": 1.0}, {"step": 2, "bubble": 0.4, "step_s": 3.0, "moe_dropped": 0.1}]
    assert run_means(records) == {"step_s": 2.0, "moe_dropped": 0.1, "bubble": 0.3}
    assert run_means([{"step": 1, "loss": 3.0}]) == {}
