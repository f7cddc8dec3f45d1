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
    # metrics.jsonl keeps the first launch's evals (steps 2 and 4), its summary the baseline at step 0
    assert [step for step, _ in summary["eval_losses"]] == [0, 2, 4, 6], summary["eval_losses"]
    assert summary["world_size"] == 1 and summary["first_step"] == 4
    assert summary["means"]["step_s"] > 0
    text = " ".join(second.stdout.split())
    assert "at step 4: speed and time are of steps 5-6" in text and " on 1 rank " in text, second.stdout
    assert "(step 0) -> " in text and "(step 6)" in text
    for line in (first.stdout + second.stdout).splitlines():
        assert len(line) <= 80 and "…" not in line, line


def test_whole_run_evals_put_the_earlier_launches_first():
    from sdtrain.train.summary import whole_run_evals

    history = [{"step": 2, "loss": 4.0, "eval_loss": 3.9}, {"step": 3, "loss": 3.8}, {"step": 4, "eval_loss": None}]
    assert whole_run_evals(history, [(6, 3.1)]) == [(2, 3.9), (6, 3.1)]  # a null (non-finite) eval is no point
    assert whole_run_evals([], [(0, 5.3), (6, 3.1)]) == [(0, 5.3), (6, 3.1)]
    assert whole_run_evals(history, [(6, 3.1)], (0, 5.3)) == [(0, 5.3), (2, 3.9), (6, 3.1)]


def test_an_earlier_summary_is_read_as_data(tmp_path):
    from sdtrain.train.summary import earlier_baseline

    path = tmp_path / "summary.json"
    for text, expected in (('{"eval_losses": [[0, 5.3], [4, 3.0]]}', (0, 5.3)), ('{"eval_losses": [[2, 3.9]]}', None),
                           ('{"eval_losses": []}', None), ('[1, 2]', None), ('{"eval_losses": [[0, "x"]]}', None),
                           ('{"eval_losses": [[0, null]]}', None), ('not json', None)):
        path.write_text(text)
        assert earlier_baseline(path) == expected, text
    assert earlier_baseline(tmp_path / "absent.json") is None


def test_run_means_of_the_shares_a_strategy_logs():
    from sdtrain.train.summary import run_means

    records = [{"step": 1, "bubble": 0.2, "step_s": 1.0}, {"step": 2, "bubble": 0.4, "step_s": 3.0, "moe_dropped": 0.1}]
    assert run_means(records) == {"step_s": 2.0, "moe_dropped": 0.1, "bubble": 0.3}
    assert run_means([{"step": 1, "loss": 3.0}]) == {}
