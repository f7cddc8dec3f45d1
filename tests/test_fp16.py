"""fp16's loss scaler: DeepSpeed's rule on its own, then real runs: ZeRO 1/2/3, a pipeline and
expert parallelism at 2 ranks against one process over 20 steps (the same losses within
REL_TOL and the same loss scale and skipped steps at every step), an overflow planted on one
rank only that every rank skips, and a resume that carries the scale on.

Most runs start the scale at 2^24 (train.loss_scale.initial_scale_power), so the first steps
overflow for real and the scale comes down through hysteresis: the skipped steps are the
ones an fp16 run meets, not planted ones. REL_TOL: the 2-rank losses measured within 3.5e-5 of
one process (fp16 sums in another order), and 1e-3 would miss a real bug: Adam hardly sees a
gradient unscaled by twice the factor (DDP unscaling without its pre-divide moved the loss by
4.4e-4), while the gradient norm doubles; so the norms are held too, within NORM_TOL (measured:
1.5e-4, and 2.8e-3 under tensor parallelism, whose fp16 pieces round apart). A step skipped on
one rank and not the next moves the loss by 1e-2 and more."""

import json
import shutil

import pytest
import torch.distributed as dist

from conftest import TINY, assert_losses_match, merge, metrics, sdtrain
from test_zero import BF16, formula
from sdtrain.errors import RecipeError
from sdtrain.parallel.loss_scale import LossScaleError, LossScaler
from sdtrain.recipe_load import validate_recipe

REL_TOL = 1e-4
NORM_TOL = 1e-2
STEPS = 20
FP16 = {"train": {"steps": STEPS, "precision": "fp16", "loss_scale": {"initial_scale_power": 24}},
        "checkpoint": {"at_end": False}}


def launch(tmp, name, nproc, *overrides, env=None, recipe=None):
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(merge(TINY, merge(FP16, recipe or {}))))
    args = ["launch", path, "--nproc-per-node", nproc, "--run-dir", tmp / name]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / name


def scales(run_dir):
    return [(m["loss_scale"], m["overflow_steps"]) for m in metrics(run_dir) if "loss" in m]


def assert_same_run(reference, run_dir, steps=range(1, STEPS + 1)):
    assert_losses_match(reference, run_dir, REL_TOL, STEPS, steps)
    assert [scales(reference)[s - 1] for s in steps] == [scales(run_dir)[s - 1] for s in steps]
    for step in steps:  # null where the step overflowed
        a, b = (next(m for m in metrics(d) if m.get("step") == step and "loss" in m)["grad_norm"]
                for d in (reference, run_dir))
        assert (a is None) == (b is None) and (a is None or abs(a - b) <= NORM_TOL * a), f"step {step}: norm {a} vs {b}"


# --- the rule (DeepSpeed's DynamicLossScaler) ------------------------------------------------


def scaler(**cfg):
    base = {"initial_scale_power": 4, "window": 3, "hysteresis": 2, "min_scale": 1.0, "static": 0.0}
    return LossScaler(validate_recipe(merge(TINY, {"train": {"loss_scale": {**base, **cfg}}})).train.loss_scale, "cpu")


def test_hysteresis_halves_on_the_second_overflow_and_the_window_doubles():
    s = scaler()
    s.update(True)
    assert s.scale == 16  # the first overflow uses up a chance
    s.update(True)
    assert s.scale == 8
    s.update(True)  # the chances come back only with a doubling
    assert s.scale == 4
    for _ in range(2):
        s.update(False)
    assert s.scale == 4
    s.update(False)  # 3 good steps since the last overflow
    assert (s.scale, s.hysteresis_left, s.skipped) == (8, 2, 3)
    s.update(True)
    assert s.scale == 8


def test_at_the_minimum_an_overflow_stops_the_run():
    s = scaler(initial_scale_power=1, hysteresis=1, min_scale=1.0)
    s.update(True)
    assert s.scale == 1
    with pytest.raises(LossScaleError, match="train.loss_scale.min_scale"):
        s.update(True)


def test_a_static_scale_skips_and_never_moves():
    s = scaler(static=128.0)
    for overflow in (True, True, True, False, False, False, False):
        s.update(overflow)
    assert (s.scale, s.skipped) == (128, 3)


def test_unscale_divides_and_a_nan_anywhere_is_an_overflow():
    import torch

    assert not dist.is_initialized()
    s = scaler()
    grads = [torch.full((3,), 32.0), torch.full((2,), 16.0, dtype=torch.float16)]
    assert s.unscale(grads) is False
    assert grads[0].tolist() == [2.0] * 3 and grads[1].tolist() == [1.0] * 2
    assert s.unscale([torch.tensor([1.0, float("nan")])]) is True


def test_the_state_round_trips():
    s = scaler()
    s.update(True)
    s.update(True)
    t = scaler(initial_scale_power=10)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_bad_loss_scale_settings_are_refused():
    with pytest.raises(RecipeError, match="train.loss_scale.hysteresis"):
        validate_recipe(merge(TINY, {"train": {"loss_scale": {"hysteresis": 0}}}))
    with pytest.raises(RecipeError, match="unknown key"):
        validate_recipe(merge(TINY, {"train": {"loss_scale": {"scale_window": 10}}}))


def test_a_plan_that_does_not_fit_is_offered_zero_under_fp16_too():
    from sdtrain.estimate.suggest import candidate_changes

    changes = candidate_changes(validate_recipe(merge(TINY, {"train": {"precision": "fp16"}})))
    assert {"parallel.zero_stage": 1} in changes and {"parallel.zero_stage": 3} in changes


def test_dry_run_counts_fp16_state_as_bf16s(write_recipe):
    """Under ZeRO fp16 keeps 16-bit weights beside fp32 master shards, as bf16 does (K = 12)."""
    per_rank = {}
    for precision in ("bf16", "fp16", "fp32"):
        recipe = write_recipe({"train": {"precision": precision}, "parallel": {"zero_stage": 2}})
        result = sdtrain("launch", recipe, "--nproc-per-node", 2, "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        per_rank[precision] = json.loads(result.stdout)["stages"][0]["state_bytes_per_rank"]
    assert per_rank["fp16"] == per_rank["bf16"] != per_rank["fp32"]


# --- every strategy against one process ------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_zero(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fp16"), "zero1proc", 1, "parallel.zero_stage=2")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fp16"), "plain1proc", 1)


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_stage_matches_one_process(one_process_zero, tmp_path, stage):
    run_dir = launch(tmp_path, f"zero{stage}", 2, f"parallel.zero_stage={stage}", "parallel.zero.reduce_bucket_mb=0.05")
    assert 0 < scales(run_dir)[-1][1] < STEPS  # the scale came down through real overflows, then trained
    assert_same_run(one_process_zero, run_dir)
    # fp16 weights and gradients beside fp32 master shards: the ZeRO paper's K = 12, as bf16's
    for held in json.loads((run_dir / "summary.json").read_text())["model_state_bytes"]:
        total, expected = held["params"] + held["grads"] + held["optimizer"], formula(BF16, stage, 2)
        assert abs(total - expected) <= 0.05 * expected, f"stage {stage}: {held} vs {expected:.0f}"


@pytest.mark.parametrize("schedule", ["1f1b", "zero_bubble"])  # zero bubble: a split backward from the scaled loss
def test_pipeline_matches_one_process(one_process, tmp_path, schedule):
    run_dir = launch(tmp_path, "pp2", 2, "parallel.pipeline.stages=2", f"parallel.pipeline.schedule={schedule}")
    assert_same_run(one_process, run_dir)


@pytest.mark.slow  # 4 ranks
def test_pipeline_of_zero_replicas_matches_one_process(one_process_zero, tmp_path):
    """The tied head's gradient reaches the embedding's reduced ZeRO-2 shard with the same factor."""
    run_dir = launch(tmp_path, "pp2z2", 4, "parallel.pipeline.stages=2", "parallel.zero_stage=2")
    assert_same_run(one_process_zero, run_dir)


@pytest.mark.slow  # ZeRO and pipelines carry the scaler in make test
def test_expert_parallel_matches_one_process(tmp_path):
    moe = {"model": {"moe": {"num_experts": 4}}}
    reference = launch(tmp_path, "moe1", 1, recipe=moe)
    assert_same_run(reference, launch(tmp_path, "ep2", 2, "parallel.expert_parallel=2", recipe=moe))


# --- an overflow on one rank only ------------------------------------------------------------


def planted(rank: int) -> dict:
    """An inf in `rank`'s gradients at steps 5 and 6 (0-based 4, 5), after their reduction."""
    import os

    return {**os.environ, "SDTRAIN_INJECT_OVERFLOW": f"{rank}:4,{rank}:5"}


DEFAULT_SCALE = ["train.loss_scale.initial_scale_power=16"]  # no overflow of its own in 20 steps


@pytest.mark.parametrize("one, two", [
    (["parallel.zero_stage=2"], ["parallel.zero_stage=2"]),
    # rank 1 is the last stage: the first must skip too
    pytest.param([], ["parallel.pipeline.stages=2"], marks=pytest.mark.slow),
    # rank 1 holds the other half of every layer
    pytest.param([], ["parallel.tensor_parallel=2"], marks=pytest.mark.slow),
])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path, one, two):
    reference = launch(tmp_path, "one", 1, *DEFAULT_SCALE, *one, env=planted(0))
    run_dir = launch(tmp_path, "two", 2, *DEFAULT_SCALE, *two, env=planted(1))
    got = scales(run_dir)
    # hysteresis 2: the first overflow keeps the scale, the second halves it
    assert got[3:7] == [(65536, 0), (65536, 1), (32768, 2), (32768, 2)]
    # (at 2^24 tp's overflows differ from one process's: its pieces hold fp16 values the one
    # process does not, e.g. vocab-parallel logits; at 2^16 none overflow on their own)
    assert_same_run(reference, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["overflow_steps"], summary["loss_scale"]) == (2, 32768)
    lrs = [m["lr"] for m in metrics(run_dir) if "loss" in m]
    assert lrs[4] == lrs[5] == lrs[6]  # the schedule waits out the skipped steps


# --- resume --------------------------------------------------------------------------------------


@pytest.mark.slow  # two launches
def test_a_resumed_run_keeps_the_scale_and_the_skipped_steps(one_process_zero, tmp_path):
    every = {"checkpoint": {"every": 10, "keep": 3}}
    first = launch(tmp_path, "first", 1, "parallel.zero_stage=2", recipe=every)
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    # on 2 ranks: the scale, the same on every rank, is read whatever the layout
    launch(tmp_path, "resumed", 2, "parallel.zero_stage=2", "train.resume=auto", recipe=every)
    assert scales(first)[9][0] < 2**24  # the scale had come down by step 10
    assert_same_run(one_process_zero, resumed, steps=range(11, STEPS + 1))
