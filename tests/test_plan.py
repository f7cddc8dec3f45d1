"""The layout planner's parts (sdtrain/plan/): enumeration, memory through the estimate, the
time model's terms, layout names. Torch-free and fast."""

import subprocess
import sys
import time

import pytest

from conftest import REPO
from sdtrain.errors import UserInputError
from sdtrain.estimate.plan import estimate_recipe, largest, rank_shapes
from sdtrain.parallel.schedules import bubble_formula
from sdtrain.plan.candidate import Candidate, parse_name
from sdtrain.plan.cluster import Cluster
from sdtrain.plan.enumerate import enumerate_layouts
from sdtrain.plan.memory import axes_key, layout_memory, reshaped
from sdtrain.plan.rank import find, plan_layouts
from sdtrain.plan.time_model import RECOMPUTE
from sdtrain.recipe import load_recipe

BENCH = REPO / "recipes" / "bench-20m.yaml"


def recipe(path=BENCH, *overrides):
    return load_recipe(path, list(overrides), layout_checked_at_launch=True)


def cluster(gpus=4, per_node=4, memory=8.0, tflops=100.0, intra=100.0, inter=10.0, **more):
    return Cluster(gpus, per_node, memory, tflops, intra, inter, **more)


def test_a_thousand_layouts_in_under_five_seconds_without_torch():
    """Every axis enumerated for a 1.3B model on 64 GPUs: thousands of layouts, each priced, in
    seconds, and torch never imported (planning for a cluster needs no GPU here)."""
    code = ("import sys, time; from sdtrain.recipe import load_recipe; from sdtrain.plan.rank import plan_layouts;"
            "from sdtrain.plan.cluster import Cluster;"
            f"r = load_recipe({str(REPO / 'recipes' / 'gpt2-1.3b.yaml')!r}, layout_checked_at_launch=True);"
            "t = time.perf_counter(); rows = plan_layouts(r, Cluster(64, 8, 80, 312, 230, 23), 512);"
            "print(len(rows), sum(x.time is not None for x in rows), time.perf_counter() - t, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    layouts, priced, seconds, torch_loaded = out.stdout.split()
    assert int(layouts) >= 1000 and int(priced) >= 1000, out.stdout
    assert float(seconds) < 5, out.stdout
    assert torch_loaded == "False"


def test_every_axis_is_enumerated_and_refusals_say_why():
    rows = list(enumerate_layouts(recipe(), 4, 8, per_node=2))
    seen = {(o.candidate.pp, o.candidate.tp, o.candidate.dp) for o in rows}
    assert seen == {(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)}
    assert {o.candidate.zero_stage for o in rows} == {0, 1, 2, 3}
    assert {o.candidate.offload for o in rows} == {"none", "nvme"}
    assert {o.candidate.schedule for o in rows} == {"none", "1f1b", "gpipe", "interleaved", "zero_bubble"}
    assert {o.candidate.activation_checkpointing for o in rows} == {False, True}
    for o in rows:
        c = o.candidate
        assert c.micro_batch_size * c.grad_accum_steps * c.dp == 8
        assert (o.recipe is None) == bool(o.reason), c.name
    reasons = {o.candidate.name: o.reason for o in rows if o.recipe is None}
    assert "spans nodes" in reasons["pp1-tp4-dp1-z0-mb8-ac0"]  # tp 4 > 2 per node
    assert "zero_bubble" in reasons["pp2-tp1-dp2-z0-mb1-ac1-zero_bubble"]  # the recipe's own check
    assert "micro-batches" in reasons["pp2-tp1-dp2-z0-mb4-ac0"]  # 1f1b needs M >= P
    # ZeRO at dp 1 shards nothing: refused, unless it offloads (which runs through ZeRO), and then
    # stage 1 alone, unless the recipe offloads stage 3's weights too
    assert "dp, which is 1" in reasons["pp2-tp2-dp1-z3-mb2-ac0-gpipe"]
    assert "pp2-tp2-dp1-z1-nvme-mb2-ac0-gpipe" not in reasons and "pp2-tp1-dp2-z3-mb1-ac0-gpipe" not in reasons
    for stage in (2, 3):
        assert "same optimizer state as stage 1" in reasons[f"pp2-tp2-dp1-z{stage}-nvme-mb2-ac0-gpipe"]
    weights_off = recipe(BENCH, "parallel.zero_stage=3", "parallel.zero.offload_params=nvme")
    assert any(o.candidate.name == "pp2-tp2-dp1-z3-nvme-mb2-ac0-gpipe" and o.recipe is not None
               for o in enumerate_layouts(weights_off, 4, 8, per_node=2))
    # the recipe's n_layers 7 cannot be cut into 4 stages x 2 chunks
    assert "interleaved" in reasons["pp4-tp1-dp1-z0-mb1-ac0-interleaved2"] or "chunks" in reasons["pp4-tp1-dp1-z0-mb1-ac0-interleaved2"]


def test_memory_is_the_estimate_of_the_layouts_own_recipe():
    """No second memory model: each layout's memory is estimate_recipe of its recipe, and the
    shortcut that makes thousands fast (reshaped) gives rank_shapes' own shapes on every layout."""
    base = recipe(BENCH, "model.n_layers=4")
    options = [o for o in enumerate_layouts(base, 4, 8, per_node=4) if o.recipe is not None]
    assert len(options) > 100
    first_of_axes = {}
    for o in options:
        shapes = rank_shapes(o.recipe, 4, "cpu")
        first = first_of_axes.setdefault(axes_key(o.candidate), shapes)
        assert reshaped(first, o.recipe, "cpu") == shapes, o.candidate.name
    for o in options[::7]:
        assert layout_memory(o.recipe, 4, "cpu").device_bytes == largest(estimate_recipe(o.recipe, 4, "cpu")).total


def test_nvme_offload_moves_the_optimizer_state_off_the_device():
    rows = plan_layouts(recipe(), cluster(), 8)
    on, off = find(rows, "pp1-tp1-dp4-z1-mb2-ac0"), find(rows, "pp1-tp1-dp4-z1-nvme-mb2-ac0")
    assert off.memory.device_bytes < on.memory.device_bytes and off.memory.disk_bytes > 0
    names = [t.name for t in off.time.terms]
    assert "offload I/O" in names and "optimizer step (host)" in names


def term(row, name):
    return next((t.seconds for t in row.time.terms if t.name == name), 0.0)


def test_offload_io_adds_to_the_host_step_on_cpu_ranks_and_zero_pays_its_own_passes():
    """On CPU the page-cache copies run on the cores the offloaded step needs, so nothing of
    the I/O hides; on a GPU's host it overlaps the step. ZeRO's passes over gradients and
    weights are priced at memory bandwidth, the whole rank's only at stages 1-2."""
    name = "pp1-tp1-dp4-z1-nvme-mb2-ac0"
    on_gpu = find(plan_layouts(recipe(), cluster(disk_gbps=3.0, host_memory_gbps=50.0), 8), name)
    on_cpu = find(plan_layouts(recipe(), cluster(device="cpu", disk_gbps=3.0, host_memory_gbps=50.0), 8), name)
    host, disk = term(on_cpu, "optimizer step (host)"), term(on_cpu, "offload I/O")
    assert term(on_gpu, "optimizer step (host)") == pytest.approx(host)
    assert term(on_gpu, "offload I/O") == pytest.approx(disk - host)
    shard = on_cpu.memory.shapes[0][1].params_held / 4
    assert disk == pytest.approx(2 * shard * 8 / 3e9)  # fp32: m and v only, the master is the weights
    rows = plan_layouts(recipe(), cluster(memory_gbps=10.0), 8)
    passes = {z: term(find(rows, f"pp1-tp1-dp4-z{z}-mb2-ac0"), "zero passes") for z in range(4)}
    held = find(rows, "pp1-tp1-dp4-z1-mb2-ac0").memory.shapes[0][1].params_held
    assert passes[0] == 0 and passes[3] == pytest.approx(held / 4 * 28 / 10e9)
    assert passes[1] == pytest.approx(passes[3] + held * 20 / 10e9) and passes[1] > passes[2] > passes[3]


def test_time_model_terms():
    rows = plan_layouts(recipe(BENCH, "model.n_layers=8"), cluster(intra=0.5, inter=0.5), 8)
    # the schedule's bubble: (P-1)/(M+P-1) of the step's pipeline time (8 blocks, 4 a stage)
    row = find(rows, "pp2-tp1-dp2-z0-mb1-ac0")
    M = row.candidate.grad_accum_steps
    busy = sum(term(row, n) for n in ("compute", "pp p2p"))
    # (the last stage's head makes it 1% the heavier: its bubble is the first stage's 4 blocks)
    assert term(row, "pipeline bubble") == pytest.approx(busy * bubble_formula("1f1b", 2, 1, M) / (1 - bubble_formula("1f1b", 2, 1, M)), rel=0.02)
    # bench-20m's own 7 blocks split 4 + 3, and the lighter stage fills and drains in its own
    # time: the bubble is what the 3 blocks (and the head) take, not the 4
    uneven = find(plan_layouts(recipe(), cluster(intra=0.5, inter=0.5), 8), row.name)
    share = bubble_formula("1f1b", 2, 1, M) / (1 - bubble_formula("1f1b", 2, 1, M))
    first, last = (shape for _, shape in uneven.memory.shapes)
    assert (first.layers, last.layers) == (4, 3)
    ratio = term(uneven, "pipeline bubble") / ((term(uneven, "compute") + term(uneven, "pp p2p")) * share)
    assert 0.75 < ratio < 0.8  # 3 blocks and the head against 4 blocks
    # checkpointing recomputes forward: 4/3 of the compute
    plain, recomputed = find(rows, "pp1-tp1-dp4-z0-mb2-ac0"), find(rows, "pp1-tp1-dp4-z0-mb2-ac1")
    assert term(recomputed, "compute") == pytest.approx(RECOMPUTE * term(plain, "compute"))
    # on a slow network ZeRO-3's three transfers per micro-batch cost more than DDP's one all-reduce
    assert find(rows, "pp1-tp1-dp4-z3-mb2-ac0").time.seconds > plain.time.seconds
    # tensor parallelism on a slow link pays its per-layer collectives
    assert term(find(rows, "pp1-tp2-dp2-z0-mb2-ac0"), "tp collectives") > 0
    # the ranking is by predicted tokens/s among those that fit
    fitting = [r for r in rows if r.fits]
    speeds = [round(r.time.tokens_per_s, 6) for r in fitting]  # as ranked() compares them: equal sums, summed in another order, tie
    assert speeds == sorted(speeds, reverse=True)


def test_ranks_sharing_cores_stretch_their_busy_time_and_lend_their_bubble():
    """Without a pipeline every rank computes at once: the step stretches by 1 / rank_share. A
    stage of two ranks fills the two cores that four share, so the other stage's wait idles
    none: the pipeline's work (8 balanced blocks) over the cores, and the rest stretched."""
    whole = plan_layouts(recipe(BENCH, "model.n_layers=8"), cluster(device="cpu"), 8)
    shared = plan_layouts(recipe(BENCH, "model.n_layers=8"), cluster(device="cpu", rank_share=0.5), 8)
    for name in ("pp1-tp1-dp4-z0-mb2-ac0", "pp2-tp1-dp2-z0-mb1-ac0"):
        alone, sharing = find(whole, name), find(shared, name)
        assert term(alone, "cores shared") == 0
        busy = alone.time.seconds - term(alone, "pipeline bubble")  # the pipeline's wait costs no core
        assert sharing.time.seconds == pytest.approx(busy / 0.5, rel=0.01)  # the head makes one stage 1% the heavier
    # pp 4 on 2 cores' worth: its fill and drain idle a core, so more than busy / share
    alone, sharing = find(whole, "pp4-tp1-dp1-z0-mb1-ac0-gpipe"), find(shared, "pp4-tp1-dp1-z0-mb1-ac0-gpipe")
    assert sharing.time.seconds > (alone.time.seconds - term(alone, "pipeline bubble")) / 0.5 * 1.03  # 17 units of 16
    assert "gpipe schedule run with 2 cores shared by 4 ranks" in next(
        t.detail for t in sharing.time.terms if t.name == "cores shared")
    with pytest.raises(UserInputError, match="rank_share"):
        cluster(rank_share=1.5)


def test_zero3_latency_hides_under_compute_on_cpu_ranks_but_its_transfers_do_not():
    """On CPU ranks gloo's copies take the cores, so ZeRO-3's bytes add to the step in full;
    its collectives' latency is waiting, which the prefetch hides under the compute left."""
    name, z3 = "pp1-tp1-dp4-z3-mb2-ac0", "zero-3 gathers + reduce-scatter"

    def row(**link):
        return find(plan_layouts(recipe(), cluster(device="cpu", tflops=0.1, **link), 8), name)

    quick, waiting = row(latency_us=1.0), row(latency_us=1000.0)
    M = quick.candidate.grad_accum_steps
    waits = 3 * 8 * 1e-3  # three collectives per unit (7 blocks and the root) a micro-batch, 1 ms each
    assert waits < term(quick, "compute") / M - term(quick, z3) / M  # room under the compute
    # so every wait hides but the first block's gather, each way
    assert term(waiting, z3) - term(quick, z3) == pytest.approx(M * 2 * (1e-3 - 1e-6))
    # while the bytes are exposed in full: half the bandwidth, twice the term
    assert term(row(latency_us=1.0, intra=50.0, inter=5.0), z3) == pytest.approx(2 * term(quick, z3), rel=1e-3)


def test_a_measured_tp_overhead_prices_tp_layouts_in_place_of_their_collectives():
    priced = plan_layouts(recipe(), cluster(device="cpu"), 8)
    measured = plan_layouts(recipe(), cluster(device="cpu", tp_overheads=((2, 1.5),)), 8)
    name = "pp1-tp2-dp2-z0-mb2-ac0"
    assert term(find(measured, name), "compute") == pytest.approx(1.5 * term(find(priced, name), "compute"))
    assert term(find(priced, name), "tp collectives") > 0 and term(find(measured, name), "tp collectives") == 0
    # tp 4 was not measured: priced from FLOPs and bandwidth as before
    assert find(measured, "pp1-tp4-dp1-z0-mb2-ac0").time.seconds == find(priced, "pp1-tp4-dp1-z0-mb2-ac0").time.seconds


def test_a_layout_that_does_not_fit_says_so_with_the_margin():
    rows = plan_layouts(recipe(), cluster(memory=0.3, device="cpu"), 8, margin=0.1)
    assert not any(r.fits for r in rows)
    assert "0.27 GiB" in rows[0].reason and "10% margin" in rows[0].reason


def test_layout_names_round_trip():
    c = Candidate(2, 1, 2, 1, 3, "none", 4, 1, False, "1f1b")
    assert c.name == "pp2-tp1-dp2-z3-mb4-ac0" and parse_name(c.name, 8) == c
    c = Candidate(4, 2, 4, 2, 1, "nvme", 1, 8, True, "interleaved", 2)
    assert c.name == "pp4-tp2-dp4-ep2-z1-nvme-mb1-ac1-interleaved2" and parse_name(c.name, 32) == c
    assert parse_name("pp1-tp1-dp2-z0-mb4-ac0", 8).schedule == "none"
    for bad in ("pp2-dp2", "pp2-tp1-dp2-z4-mb4-ac0", "pp2-tp1-dp3-z3-mb4-ac0"):
        with pytest.raises(UserInputError):
            parse_name(bad, 8)


def test_published_scale_gpt3_on_a_thousand_a100s():
    """GPT-3 175B on 1,024 80 GB A100s, 8 per node (Narayanan et al. 2021 measured 140 TFLOP/s per
    GPU, 52% of peak, at this scale): planned in seconds, tp inside a node, MFU of that order."""
    started = time.perf_counter()
    rows = plan_layouts(recipe(REPO / "recipes" / "gpt3-175b.yaml"), Cluster(1024, 8, 80, 312, 230, 23), 1536)
    assert time.perf_counter() - started < 60  # seconds on an idle machine; slack for a shared one
    fitting = [r for r in rows if r.fits]
    assert fitting and all(r.candidate.tp <= 8 for r in fitting)
    best = fitting[0]
    assert 0.30 <= best.time.mfu <= 0.70, (best.name, best.time.mfu)
    megatron = find(rows, "pp8-tp8-dp16-z0-mb1-ac1-interleaved2")  # close to the paper's own layout
    assert megatron is not None and 0.30 <= megatron.time.mfu <= 0.70
