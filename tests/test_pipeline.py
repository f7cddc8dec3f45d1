"""Pipeline parallelism against the single-process run of the same recipe: every schedule at
P = 2 and 4, P = 2 x D = 2 with each ZeRO stage, a layer count P does not divide, and
checkpoints that continue in another layout. Real processes on gloo, fp32, 20 steps."""

import pytest
import torch

from conftest import TINY, assert_losses_match, launch_run, losses, merge, metrics, sdtrain
from sdtrain.model import GPTConfig
from sdtrain.parallel.partition import describe_stages, partition_layers, stage_layers
from sdtrain.parallel.schedules import bubble_formula, build_schedule, simulate, replay
from sdtrain.recipe import PipelineConfig
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5
STEPS = 20
# 8 blocks: P = 4 with V = 2 still has one per chunk; global batch 8 of micro-batches of 1
# gives M = 8 / D micro-batches per step, enough for 1F1B at P = 4.
PIPE = {"model": {"n_layers": 8}, "train": {"steps": STEPS, "micro_batch_size": 1},
        "checkpoint": {"at_end": True, "every": 10, "keep": 3}}


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, PIPE), *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ref"), "single", 1)


def assert_same_losses(reference, run_dir, steps=range(1, STEPS + 1)):
    assert_losses_match(reference, run_dir, REL_TOL, STEPS, steps)


def assert_same_weights(reference, run_dir):
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys()  # blocks.7.* wherever block 7 ran; the head is stored once
    for name in ours:
        # atol: the key bias has a zero gradient, which Adam turns into ~1e-6 noise (see test_ddp)
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=1e-5, msg=name)


SLOW = pytest.mark.slow  # the rest of the matrix: `make test-slow`


@pytest.mark.parametrize("stages, schedule, virtual", [
    pytest.param(2, "1f1b", 1, marks=SLOW), pytest.param(2, "gpipe", 1, marks=SLOW), (2, "interleaved", 2),
    pytest.param(4, "1f1b", 1, marks=SLOW), pytest.param(4, "gpipe", 1, marks=SLOW), pytest.param(4, "interleaved", 2, marks=SLOW),
    (3, "1f1b", 1),  # 8 layers over 3 stages: 3 + 3 + 2
    (2, "zero_bubble", 1), pytest.param(4, "zero_bubble", 1, marks=SLOW),
])
def test_schedule_matches_single_process(reference, tmp_path, stages, schedule, virtual):
    run_dir = launch(tmp_path, f"pp{stages}-{schedule}", stages, f"parallel.pipeline.stages={stages}",
                     f"parallel.pipeline.schedule={schedule}", f"parallel.pipeline.virtual_stages={virtual}")
    assert_same_losses(reference, run_dir)
    assert_same_weights(reference, run_dir)
    record = metrics(run_dir)[-1]
    assert 0.0 <= record["bubble"] < 1.0 and len(record["bubble_per_stage"]) == stages
    assert len(record["mem_gib_per_stage"]) == stages and min(record["mem_gib_per_stage"]) > 0
    assert record["bubble_formula"] == round(bubble_formula(schedule, stages, virtual, 8), 4)
    # the schedule replayed on the run's own compute times, communication free: never more
    # idle than the run itself was (a tolerance for the two clocks' rounding)
    assert 0.0 <= record["bubble_replayed"] <= record["bubble"] + 0.02


def test_activation_checkpointing_with_a_pipeline(reference, tmp_path):
    run_dir = launch(tmp_path, "pp2-ac", 2, "parallel.pipeline.stages=2", "train.activation_checkpointing=true")
    assert_same_losses(reference, run_dir)


@SLOW
def test_bf16_with_a_pipeline_and_zero(reference, tmp_path):
    """bf16 weights under ZeRO-2 on each stage: the fp32 run's losses, to bf16's precision."""
    run_dir = launch(tmp_path, "pp2-bf16", 4, "parallel.pipeline.stages=2", "parallel.zero_stage=2",
                     "train.precision=bf16")
    for step, (fp32, bf16) in enumerate(zip(losses(reference), losses(run_dir)), 1):
        assert abs(fp32 - bf16) <= 1e-2 * fp32, f"step {step}: fp32 {fp32} vs bf16 {bf16}"


@pytest.fixture(scope="module")
def two_by_two(reference, tmp_path_factory):
    """P = 2 x D = 2 at ZeRO 0: its step-10 checkpoint is continued in other layouts below."""
    return launch(tmp_path_factory.mktemp("pp2dp2"), "pp2dp2", 4, "parallel.pipeline.stages=2")


@pytest.mark.parametrize("stage, schedule", [
    (0, "1f1b"), pytest.param(1, "1f1b", marks=SLOW), pytest.param(2, "1f1b", marks=SLOW),
    pytest.param(3, "1f1b", marks=SLOW),  # make test keeps ZeRO-3 under gpipe, below
    pytest.param(2, "zero_bubble", marks=SLOW),
    pytest.param(3, "zero_bubble", marks=SLOW),  # W passes feed ZeRO's reduce-scatters
    (3, "gpipe"),  # every forward before any backward: the roots freed by the first are gathered again
    pytest.param(3, "interleaved", marks=SLOW),
])
def test_pipeline_with_data_parallel_and_zero(reference, two_by_two, tmp_path, stage, schedule):
    run_dir = two_by_two if stage == 0 else launch(
        tmp_path, f"pp2dp2-zero{stage}-{schedule}", 4, "parallel.pipeline.stages=2", f"parallel.zero_stage={stage}",
        "parallel.zero.reduce_bucket_mb=0.05", f"parallel.pipeline.schedule={schedule}",
        f"parallel.pipeline.virtual_stages={2 if schedule == 'interleaved' else 1}")
    assert_same_losses(reference, run_dir)
    assert_same_weights(reference, run_dir)


@pytest.mark.parametrize("nproc, overrides", [
    pytest.param(1, [], marks=SLOW),  # one process, no pipeline
    pytest.param(4, ["parallel.pipeline.stages=4"], marks=SLOW),
    (4, ["parallel.pipeline.stages=2", "parallel.zero_stage=3"]),
])
def test_checkpoint_continues_in_another_layout(reference, two_by_two, tmp_path, nproc, overrides):
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(two_by_two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_20")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    run_dir = launch(tmp_path, "resumed", nproc, *overrides, "train.resume=auto")
    assert_same_losses(reference, run_dir, steps=range(11, STEPS + 1))


# --- the parts that need no processes -------------------------------------------------

def test_replay_on_measured_costs_shows_an_unbalanced_stage():
    """1F1B, P = 2, M = 4, forward 1 and backward 2 everywhere but a last stage 50 % slower:
    the first stage waits for it, so the replay's bubble is above the formula by exactly
    what that costs (worked by hand: step 4 x 4.5 + 3 = 21 units, busy 12 and 18)."""
    schedule = build_schedule("1f1b", 2, 1, 4)
    costs = [[1.0 if a.kind == "F" else 2.0 for a in schedule[0]],
             [1.5 if a.kind == "F" else 3.0 for a in schedule[1]]]
    even = simulate(schedule, 2, 2, costs=[[1.0 if a.kind == "F" else 2.0 for a in actions] for actions in schedule])
    assert even["bubble_mean"] == pytest.approx(bubble_formula("1f1b", 2, 1, 4))
    uneven = simulate(schedule, 2, 2, costs=costs)
    assert uneven["step"] == pytest.approx(21.0)
    assert uneven["bubble"] == pytest.approx([1 - 12 / 21, 1 - 18 / 21])


def test_replay_keeps_each_steps_jitter():
    """GPipe, P = 2, M = 2, forward 1 and backward 2, but one forward runs 3 in each step:
    the first stage's second one in step A, the second stage's first one in step B. Each step
    then takes 11 units with 8 busy on the slow rank and 6 on the other (worked by hand), a
    bubble of 1 - 14/22; the same costs averaged over the steps (forward 2 where either ran
    long) replay at 10 units, 1 - 14/20: averaging would hide what the jitter cost."""
    schedule = build_schedule("gpipe", 2, 1, 2)  # F m0, F m1, B m0, B m1 on each rank
    step_a = [[1.0, 3.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    step_b = [[1.0, 1.0, 2.0, 2.0], [3.0, 1.0, 2.0, 2.0]]
    per_rank = [[step_a[r], step_b[r]] for r in range(2)]
    assert replay(schedule, 2, per_rank) == pytest.approx(1 - 14 / 22)
    averaged = [[[1.0, 2.0, 2.0, 2.0]] * 2, [[2.0, 1.0, 2.0, 2.0]] * 2]
    assert replay(schedule, 2, averaged) == pytest.approx(1 - 14 / 20)
    assert replay(schedule, 2, [[], []]) is None


@pytest.mark.parametrize("name, P, V, M", [
    ("gpipe", 2, 1, 4), ("1f1b", 2, 1, 2), ("1f1b", 4, 1, 8), ("1f1b", 4, 1, 4),
    ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8), ("interleaved", 2, 3, 2),
    ("zero_bubble", 2, 1, 2), ("zero_bubble", 2, 1, 8), ("zero_bubble", 4, 1, 8), ("zero_bubble", 3, 1, 6),
])
def test_schedule_runs_every_pass_once_without_deadlock(name, P, V, M):
    schedule = build_schedule(name, P, V, M)
    kinds = "FBW" if name == "zero_bubble" else "FB"
    for p, actions in enumerate(schedule):
        wanted = {(kind, c, m) for kind in kinds for c in range(p, P * V, P) for m in range(M)}
        assert len(actions) == len(wanted) and set(map(tuple, actions)) == wanted
    result = simulate(schedule, P, P * V)
    assert result["finished"]
    # on ideal ranks (backward twice a forward) the bubble is the textbook formula
    assert result["bubble"] == pytest.approx([bubble_formula(name, P, V, M)] * P) or name == "zero_bubble"
    if name == "zero_bubble":  # the same work as 1F1B, less idle, no more micro-batches in flight
        one_f_one_b = simulate(build_schedule("1f1b", P, 1, M), P, P)
        assert result["bubble_mean"] < 0.8 * one_f_one_b["bubble_mean"]
        assert result["step"] < one_f_one_b["step"]
        for p, actions in enumerate(schedule):
            in_flight = peak = 0
            for action in actions:
                in_flight += {"F": 1, "B": 0, "W": -1}[action.kind]
                peak = max(peak, in_flight)
            assert peak <= P - p


def test_split_backward_equals_the_whole_backward():
    """B (input gradient only) then W (weight gradients from what B kept) give exactly the
    gradients of one ordinary backward: of the chunk's input, every block weight, the head."""
    from sdtrain.model import GPT
    from sdtrain.parallel.weight_grads import DeferredWeightGrads

    cfg = GPTConfig(n_layers=3, d_model=32, n_heads=2, seq_len=16, vocab_size=64)
    torch.manual_seed(0)
    hidden, targets = torch.randn(2, 16, 32), torch.randint(0, 64, (2, 16))
    grads = []
    for split in (False, True):
        part = GPT(cfg, seed=5, layers=[1, 2], first=False, last=True, loss_chunk_tokens=7)
        x = hidden.clone().requires_grad_()
        deferred = DeferredWeightGrads(part, skip=(part.lm_head,)) if split else None
        if split:
            deferred.start_recording()
        loss = part.loss(part(x), targets) / 3
        if split:
            (x_grad, head_grad), pending = deferred.input_grads(deferred.stop_recording(), loss, None,
                                                                [x, part.lm_head.weight])
            assert all(p.grad is None for n, p in part.named_parameters() if n != "lm_head.weight")
            part.lm_head.weight.grad = head_grad
            touched = deferred.weight_grads(pending)
            assert len(set(touched)) == len(list(part.parameters())) - 1  # all but the head
        else:
            loss.backward()
            x_grad = x.grad
        grads.append({"input": x_grad, **{n: p.grad for n, p in part.named_parameters()}})
    whole, split = grads
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_one_f_one_b_keeps_at_most_p_micro_batches_in_flight():
    P, M = 4, 8
    for p, actions in enumerate(build_schedule("1f1b", P, 1, M)):
        in_flight = peak = 0
        for action in actions:
            in_flight += 1 if action.kind == "F" else -1
            peak = max(peak, in_flight)
        assert peak == P - p  # GPipe would hold all M


def pipeline(**kwargs):
    return PipelineConfig(**kwargs)


def test_partitions():
    cfg = GPTConfig(n_layers=10, d_model=64, n_heads=2, seq_len=32, vocab_size=50304)
    # uniform: the remainder goes to the first stages, never all on the last (DeepSpeed)
    assert [len(c) for c in partition_layers(pipeline(stages=4), cfg)] == [3, 3, 2, 2]
    assert partition_layers(pipeline(stages=2, partition=[7, 3]), cfg) == [list(range(7)), [7, 8, 9]]
    # parameters: the first and last chunks carry the (large) embedding and head copy
    balanced = [len(c) for c in partition_layers(pipeline(stages=3, partition="parameters"), cfg)]
    assert sum(balanced) == 10 and balanced[1] > balanced[0] and balanced[1] > balanced[2]
    params = [row["params"] for row in describe_stages(pipeline(stages=3, partition="parameters"), cfg)]
    uniform = [row["params"] for row in describe_stages(pipeline(stages=3), cfg)]
    assert max(params) <= max(uniform)
    # interleaved: rank p holds chunks p, p + P, ...; the first chunk has the embeddings, the last the head
    cfg8 = GPTConfig(n_layers=8, d_model=64, n_heads=2, seq_len=32, vocab_size=256)
    interleaved = pipeline(stages=2, schedule="interleaved", virtual_stages=2)
    assert stage_layers(interleaved, cfg8, 0) == ([0, 1, 4, 5], True, False)
    assert stage_layers(interleaved, cfg8, 1) == ([2, 3, 6, 7], False, True)


@pytest.mark.parametrize("nproc, overrides, message", [
    (3, ["parallel.pipeline.stages=2"], "parallel.pipeline.stages 2 does not divide the world size 3"),
    (2, ["parallel.pipeline.stages=2", "model.n_layers=1"], "every chunk needs a layer"),
    (2, ["parallel.pipeline.stages=2", "train.micro_batch_size=8"], "needs at least 2 micro-batches per step"),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=interleaved", "parallel.pipeline.virtual_stages=2",
         "model.n_layers=6"], "split evenly into 2 ranks x 2 virtual stages"),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.partition=[1,2]", "model.n_layers=4"], "adding up to model.n_layers 4"),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.virtual_stages=2"], "goes with schedule interleaved"),
    (2, ["parallel.pipeline.stages=2", "parallel.pipeline.schedule=zero_bubble", "train.activation_checkpointing=true"],
     "activation checkpointing and torch.compile would bypass"),
])
def test_bad_pipeline_input_is_refused_before_launch(write_recipe, tmp_path, nproc, overrides, message):
    args = ["launch", write_recipe(), "--nproc-per-node", nproc, "--run-dir", tmp_path / "run", "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in " ".join(result.stderr.split())
