"""`sdtrain estimate`: the ZeRO paper's Figure 1 numbers, from the command line."""

import json

import pytest

from conftest import REPO, sdtrain
from sdtrain.model import GPT, GPTConfig


def estimate(*args):
    result = sdtrain("estimate", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_reproduces_zero_paper_figure_1():
    """7.5B parameters, 64 GPUs, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB."""
    out = estimate("--params", "7.5B", "--gpus", 64)
    assert out["params"] == 7_500_000_000 and out["gpus"] == 64
    gb = {stage: round(b / 1e9, 1) for stage, b in out["per_device_bytes"].items()}
    assert gb == {"0": 120.0, "1": 31.4, "2": 16.6, "3": 1.9}


def test_fp32_variant_and_recipe_input():
    out = estimate("--params", "1000", "--gpus", 4, "--precision", "fp32")
    assert out["per_device_bytes"] == {"0": 16000, "1": 10000, "2": 7000, "3": 4000}
    out = estimate(REPO / "recipes" / "gpt2-124m.yaml", "--gpus", 8)
    model = GPT(GPTConfig(n_layers=12, d_model=768, n_heads=12, seq_len=1024, vocab_size=50304, bias=False))
    assert out["params"] == model.num_params()
    assert out["per_device_bytes"]["0"] == 16 * model.num_params()


@pytest.mark.parametrize("args", [("--gpus", 8), ("--params", "lots", "--gpus", 8), ("--params", "1B", "--gpus", 0),
                                  ("--params", "1B"), (REPO / "recipes" / "quickstart.yaml", "--params", "1B", "--gpus", 2)])
def test_bad_input_exits_2(args):
    assert sdtrain("estimate", *args).returncode == 2


def _one_line(result) -> str:
    return " ".join(result.stderr.split())


@pytest.mark.parametrize("ep, expected", [
    (2, "use expert_parallel in [1] (those that also divide the data-parallel size 2)"),  # was [1, 3]
    (3, "parallel.expert_parallel 3 does not divide the data-parallel size 2"),  # was an estimate, exit 0
])
def test_expert_layout_is_checked_for_the_gpus_given(write_recipe, tmp_path, ep, expected):
    """estimate --gpus knows the world size: it refuses as launch does, in the same words."""
    recipe = write_recipe({"model": {"moe": {"num_experts": 3}}, "parallel": {"expert_parallel": ep}})
    estimated = sdtrain("estimate", recipe, "--gpus", 2)
    assert estimated.returncode == 2 and expected in _one_line(estimated), estimated.stderr
    launched = sdtrain("launch", recipe, "--nproc-per-node", 2, "--dry-run", "--run-dir", tmp_path / "run")
    assert _one_line(launched) == _one_line(estimated)


def test_a_pipelines_ddp_counts_its_in_step_bucket_not_ddps():
    """Without a pipeline torch's DDP holds a 25 MiB bucket in backward; a pipeline's replicas
    average in step (data_parallel.py), small gradients at most 4 MiB together."""
    from sdtrain.estimate.buffers import AVERAGE_BUCKET_BYTES, DDP_BUCKET_BYTES
    from sdtrain.estimate.plan import estimate_recipe
    from sdtrain.recipe import load_recipe

    def bucket_terms(*overrides):
        recipe = load_recipe(REPO / "recipes" / "bench-20m.yaml", list(overrides), layout_checked_at_launch=True)
        return [(t.name, t.bytes, t.phase) for e in estimate_recipe(recipe, 4) for t in e.terms if "bucket" in t.name]

    assert bucket_terms("parallel.zero_stage=0") == [("DDP bucket in flight", DDP_BUCKET_BYTES, "forward/backward")]
    piped = bucket_terms("parallel.zero_stage=0", "parallel.pipeline.stages=2")
    assert piped == [("gradient bucket", AVERAGE_BUCKET_BYTES, "optimizer step")] * 2  # each stage's
