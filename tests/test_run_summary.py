"""The end-of-run summary and the step lines, from a real run and from its resume on another
number of ranks: the eval line spans the whole run, the rank count and throughput say which
launch they cover, and nothing is wider than an 80-column terminal."""

import json

from conftest import TINY, merge, metrics, sdtrain

RUN = merge(TINY, {"train": {"steps": 4, "eval_every": 2}, "launch": {"nproc_per_node": 2},
                   "checkpoint": {"every": 2, "at_end": True}, "log": {"every": 2}})


def test_a_resumed_runs_summary_covers_the_whole_run(write_recipe, tmp_path):
    recipe, run_dir = write_recipe(RUN), tmp_path / "run"
    first = sdtrain("launch", recipe, "--run-dir", run_dir, env={"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "step 2/4: loss " in first.stdout and " lr " in first.stdout and " gnorm " in first.stdout
    assert " s/step" in first.stdout and " tok/s" in first.stdout
    assert all("step_s" in row for row in metrics(run_dir))

    second = sdtrain("launch", recipe, "--run-dir", run_dir, "--nproc-per-node", "1", "--set", "train.steps=6",
                     "--set", "train.resume=auto", env={"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # metrics.jsonl keeps the first launch's evals (steps 2 and 4); the baseline at step 0
    # lived only in the first launch's summary
    assert [step for step, _ in summary["eval_losses"]] == [2, 4, 6], summary["eval_losses"]
    assert summary["world_size"] == 1 and summary["first_step"] == 4
    assert summary["means"]["step_s"] > 0
    text = " ".join(second.stdout.split())
    assert "at step 4: speed and time are of steps 5-6" in text and " on 1 rank " in text, second.stdout
    assert "(step 2) -> " in text and "(step 6)" in text
    for line in (first.stdout + second.stdout).splitlines():
        assert len(line) <= 80 and "…" not in line, line
