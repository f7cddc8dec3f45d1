"""Data parallelism (zero_stage 0) against the single-process run of the same recipe."""

import pytest
import torch

from conftest import losses, metrics, sdtrain
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5  # fp32 on CPU: only the order of the gradient sums differs


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    """World size 1, 4 micro-batches of 2: the reference every strategy must reproduce."""
    return _run(tmp_path_factory.mktemp("ws1"), nproc=1)


def _run(tmp, nproc, extra=()):
    import yaml

    from conftest import TINY, merge

    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(merge(TINY, {"checkpoint": {"at_end": True}})))
    run_dir = tmp / "run"
    result = sdtrain("launch", recipe, "--nproc-per-node", nproc, "--run-dir", run_dir, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.mark.parametrize("extra", [pytest.param((), marks=pytest.mark.slow), ("--set", "train.micro_batch_size=1")],
                         ids=["accum2", "accum4"])
def test_two_ranks_match_one(single_process_run, tmp_path, extra):
    reference = losses(single_process_run)
    assert len(reference) == 10 and reference[-1] < reference[0]
    run_dir = _run(tmp_path, nproc=2, extra=extra)
    got = losses(run_dir)
    assert len(got) == 10
    for step, (a, b) in enumerate(zip(reference, got), 1):
        assert abs(a - b) <= REL_TOL * abs(a), f"step {step}: world size 1 loss {a} vs world size 2 loss {b}"

    # Final weights too. The key bias has a mathematically zero gradient (softmax ignores a
    # shift shared by all keys), so Adam turns pure rounding noise into ~1e-6 moves there:
    # hence an absolute tolerance beside the relative one.
    ours, _ = load_model_weights(run_dir)
    theirs, _ = load_model_weights(single_process_run)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


def test_metrics_contract(single_process_run):
    rows = metrics(single_process_run)
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib", "elapsed_s"} <= row.keys()
        assert row["mfu"] is None  # no peak FLOP/s is known for a CPU
        assert row["tokens_per_s"] > 0 and row["mem_gib"] > 0
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert "eval_loss" in rows[-1]
    assert (single_process_run / "recipe.yaml").is_file()
    assert (single_process_run / "logs" / "rank0.log").is_file()


def test_peak_flops_gives_mfu(tmp_path):
    run_dir = _run(tmp_path, nproc=1, extra=("--set", "train.peak_flops=1e11", "--set", "train.steps=3"))
    row = metrics(run_dir)[-1]
    fpt = 6 * (2 * 12 * 32 * 32 + 2 * 13 * 32 + 256 * 32 + 2 * 32) + 12 * 2 * 32 * 32
    assert row["mfu"] == pytest.approx(fpt * row["tokens_per_s"] / 1e11, rel=1e-6)


def test_a_pipelines_gradients_average_large_ones_in_place_and_small_ones_bucketed():
    """DataParallel under a pipeline averages in step(): a gradient of AVERAGE_BUCKET_BYTES or
    more alone (in place, no copy), smaller ones together up to that size, every one once."""
    from sdtrain.parallel.data_parallel import AVERAGE_BUCKET_BYTES, _average_buckets

    floats = AVERAGE_BUCKET_BYTES // 4
    grads = [torch.zeros(10), torch.zeros(floats), torch.zeros(floats // 2), torch.zeros(floats // 2 + 1),
             torch.zeros(3)]
    buckets = _average_buckets(grads)
    assert [[g.numel() for g in b] for b in buckets] == [[floats], [10, floats // 2], [floats // 2 + 1, 3]]
    assert sorted(id(g) for b in buckets for g in b) == sorted(id(g) for g in grads)
    assert all(sum(g.numel() * 4 for g in b) <= AVERAGE_BUCKET_BYTES for b in buckets if len(b) > 1)
