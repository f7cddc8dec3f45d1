"""The Layout (the one description of the parallel axes) and the meshes built from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from sdtrain.errors import RecipeError
from sdtrain.parallel.layout import Layout


def test_at_tp_1_ranks_are_laid_out_as_before_tensor_parallelism():
    """rank = stage x dp + dp_rank, every stage's ranks contiguous (what ParallelDims said)."""
    for world, pp, ep in [(1, 1, 1), (4, 1, 1), (4, 2, 1), (8, 2, 2), (6, 3, 1), (8, 1, 4)]:
        layout = Layout(world, pp, ep=ep)
        dp = world // pp
        assert layout.dp == dp and layout.as_dict() == {"pp": pp, "dp": dp, "tp": 1, "ep": ep}
        for rank in range(world):
            assert layout.coordinates(rank) == {"pipeline_stage": rank // dp, "dp_rank": rank % dp, "tp_rank": 0,
                                                "expert_group": rank % dp // ep}
        for stage in range(pp):
            assert layout.stage_ranks(stage) == layout.dp_ranks(stage) == list(range(stage * dp, (stage + 1) * dp))
        assert [layout.pipeline_ranks(d) for d in range(dp)] == [[s * dp + d for s in range(pp)] for d in range(dp)]


@pytest.mark.parametrize("world, pp, tp, ep", [(8, 2, 2, 1), (8, 1, 2, 2), (16, 2, 2, 2), (12, 3, 2, 1), (8, 2, 1, 2)])
def test_every_rank_round_trips_through_its_coordinates(world, pp, tp, ep):
    layout = Layout(world, pp, tp, ep)
    seen = set()
    for rank in range(world):
        stage, dp_rank, tp_rank = layout.stage_of(rank), layout.dp_rank_of(rank), layout.tp_rank_of(rank)
        assert layout.rank_of(stage, dp_rank, tp_rank) == rank
        assert dp_rank == layout.edp_rank_of(rank) * ep + layout.ep_rank_of(rank)
        seen.add((stage, dp_rank, tp_rank))
        # every group this rank is in holds it, at the place its coordinates say
        assert layout.dp_ranks(stage, tp_rank)[dp_rank] == rank
        assert layout.tp_ranks(stage, dp_rank)[tp_rank] == rank
        assert layout.pipeline_ranks(dp_rank, tp_rank)[stage] == rank
        assert layout.ep_ranks(stage, layout.edp_rank_of(rank), tp_rank)[layout.ep_rank_of(rank)] == rank
        assert layout.edp_ranks(stage, layout.ep_rank_of(rank), tp_rank)[layout.edp_rank_of(rank)] == rank
    assert len(seen) == world == pp * layout.dp * tp


def test_tp_is_innermost_then_dp_with_ep_inside_then_pp():
    """pp = 2, dp = 2, tp = 2: rank = ((stage x dp) + dp_rank) x tp + tp_rank."""
    layout = Layout(8, pp=2, tp=2)
    assert layout.as_dict() == {"pp": 2, "dp": 2, "tp": 2, "ep": 1}
    assert [layout.tp_ranks(s, d) for s in range(2) for d in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [layout.dp_ranks(s, t) for s in range(2) for t in range(2)] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert [layout.pipeline_ranks(d, t) for d in range(2) for t in range(2)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.stage_ranks(1) == [4, 5, 6, 7]
    assert layout.tied_pairs() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.coordinates(5) == {"pipeline_stage": 1, "dp_rank": 0, "tp_rank": 1, "expert_group": 0}
    assert layout.mesh_dims() == ((2, 2, 2), ("pp", "dp", "tp"))


def test_experts_are_carved_out_of_dp_inside_each_tp_rank():
    """dp = 4 = edp 2 x ep 2, tp = 2: the experts' groups never mix tensor-parallel ranks."""
    layout = Layout(8, tp=2, ep=2)
    assert (layout.dp, layout.edp) == (4, 2)
    assert layout.ep_ranks(0, edp_rank=0, tp_rank=0) == [0, 2]
    assert layout.ep_ranks(0, edp_rank=1, tp_rank=1) == [5, 7]
    assert layout.edp_ranks(0, ep_rank=0, tp_rank=0) == [0, 4]
    assert layout.edp_ranks(0, ep_rank=1, tp_rank=1) == [3, 7]
    assert layout.mesh_dims() == ((1, 2, 2, 2), ("pp", "edp", "ep", "tp"))
    assert layout.explain() == "world 8 = pipeline stages 1 x data_parallel 4 x tensor_parallel 2 (expert_parallel 2 inside data_parallel)"
    assert layout.tied_pairs() == []


def test_of_reads_the_recipes_axes():
    parallel = SimpleNamespace(pipeline=SimpleNamespace(stages=2), expert_parallel=2, tensor_parallel=1)
    assert Layout.of(SimpleNamespace(parallel=parallel), 8) == Layout(8, 2, 1, 2)
    parallel.tensor_parallel = 2
    assert Layout.of(SimpleNamespace(parallel=parallel), 16).as_dict() == {"pp": 2, "dp": 4, "tp": 2, "ep": 2}


@pytest.mark.parametrize("args, message", [
    ((3, 2), "parallel.pipeline.stages 2 does not divide the world size 3: every stage needs the same number of "
             "data-parallel replicas; use stages in [1, 3], or 4 workers"),
    ((6, 2, 2), "parallel.tensor_parallel 2 x parallel.pipeline.stages 2 = 4 does not divide the world size 6: every "
                "stage needs whole tensor-parallel groups; use tensor_parallel in [1, 3], or 8 workers"),
    ((6, 1, 1, 4), "parallel.expert_parallel 4 does not divide the data-parallel size 6 (world 6 / pipeline stages 1): "
                   "expert groups are carved out of data-parallel ranks; use expert_parallel in [1, 2, 3, 6]"),
    ((8, 2, 2, 4), "parallel.expert_parallel 4 does not divide the data-parallel size 2 (world 8 / (pipeline stages 2 x "
                   "tensor_parallel 2)): expert groups are carved out of data-parallel ranks; use expert_parallel in "
                   "[1, 2], or tensor_parallel in [1]"),
    ((16, 1, 8, 4), "parallel.expert_parallel 4 does not divide the data-parallel size 2 (world 16 / (pipeline stages 1 "
                    "x tensor_parallel 8)): expert groups are carved out of data-parallel ranks; use expert_parallel in "
                    "[1, 2], or tensor_parallel in [1, 2, 4]"),
    ((4, 1, 0), "parallel.tensor_parallel 0: must be at least 1"),
])
def test_a_layout_that_does_not_fit_says_why_and_what_would(args, message):
    with pytest.raises(RecipeError) as error:
        Layout(*args)
    assert str(error.value) == message


def test_if_fits_is_none_where_the_world_does_not_split():
    assert Layout.if_fits(None, 2) is None and Layout.if_fits(3, 2) is None and Layout.if_fits(8, 2, 3) is None
    assert Layout.if_fits(6, ep=4) is None and Layout.if_fits(8, 2, 2, ep=4) is None
    assert Layout.if_fits(8, 2, 2).dp == 2 and Layout.if_fits(8, 2, ep=2).edp == 2


# --- the meshes of real processes -------------------------------------------------------------

LAYOUTS = [Layout(4, pp=2), Layout(4, tp=2), Layout(4, ep=2), Layout(4, tp=2, ep=2)]


def _record_groups(rank: int, world: int, folder: str) -> None:
    """One rank: join, build each layout's meshes, write the ranks of every group it is in."""
    import torch.distributed as dist

    from sdtrain.parallel.join import STORE_FILE_VARIABLE
    from sdtrain.parallel.mesh import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    found = []
    for index, layout in enumerate(LAYOUTS):
        os.environ[STORE_FILE_VARIABLE] = f"{folder}/store{index}"
        env = init_distributed("gloo", 60, layout)
        ranks = dist.get_process_group_ranks
        found.append({
            "dp": ranks(env.dp_group), "tp": ranks(env.tp_group), "pp": ranks(env.pp_group),
            "ep": ranks(env.ep_group) if env.ep_group is not None else None, "edp": ranks(env.edp_group),
            "tied": ranks(env.tied_group) if env.tied_group is not None else None,
            "mesh_local": [env.mesh.get_local_rank("dp"), env.mesh.get_local_rank("tp"), env.mesh.get_local_rank("pp")],
            "expert_mesh": env.expert_mesh.mesh.tolist() if env.expert_mesh is not None else None,
            "tp_mesh": env.tp_mesh.mesh.tolist(),
        })
        dist.barrier()
        dist.destroy_process_group()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(found))
    os._exit(0)  # no interpreter finalization with gloo threads about (mesh.leave_process_group)


def test_the_meshes_of_real_ranks_hold_exactly_the_ranks_the_layout_says(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_record_groups, args=(4, str(tmp_path)), nprocs=4, start_method="spawn")
    for rank in range(4):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for layout, groups in zip(LAYOUTS, found):
            stage, dp_rank, tp_rank = layout.stage_of(rank), layout.dp_rank_of(rank), layout.tp_rank_of(rank)
            ep_rank, edp_rank = layout.ep_rank_of(rank), layout.edp_rank_of(rank)
            expect = {
                "dp": layout.dp_ranks(stage, tp_rank), "tp": layout.tp_ranks(stage, dp_rank),
                "pp": layout.pipeline_ranks(dp_rank, tp_rank),
                "ep": layout.ep_ranks(stage, edp_rank, tp_rank) if layout.ep > 1 else None,
                "edp": layout.edp_ranks(stage, ep_rank, tp_rank),
                "tied": next((pair for pair in layout.tied_pairs() if rank in pair), None),
                "mesh_local": [dp_rank, tp_rank, stage],
                "expert_mesh": ([[layout.rank_of(stage, j * layout.ep + e, tp_rank) for e in range(layout.ep)]
                                 for j in range(layout.edp)] if layout.ep > 1 else None),
                "tp_mesh": layout.tp_ranks(stage, dp_rank),
            }
            assert groups == expect, (layout, rank)


# --- the launcher and estimate take it ----------------------------------------------------------

def test_dry_run_json_carries_the_axes_and_each_ranks_coordinates(write_recipe, tmp_path):
    from conftest import sdtrain

    recipe = write_recipe({"parallel": {"pipeline": {"stages": 2}}})
    result = sdtrain("launch", recipe, "--nproc-per-node", 4, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["parallel"] == {"pp": 2, "dp": 2, "tp": 1, "ep": 1}
    assert plan["batch"]["data_parallel"] == 2
    assert [(p["rank"], p["pipeline_stage"], p["dp_rank"], p["tp_rank"]) for p in plan["placement"]] == [
        (0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 0), (3, 1, 1, 0)]
    text = sdtrain("launch", recipe, "--nproc-per-node", 4, "--dry-run", "--run-dir", tmp_path / "run").stdout
    assert "parallel: world 4 = pipeline stages 2 x data_parallel 2 x tensor_parallel 1\n" in text


def test_estimate_refuses_a_pipeline_its_ranks_do_not_split(write_recipe):
    """It used to estimate 2 stages on 3 ranks as if dp were 1; launch refuses that layout."""
    from conftest import sdtrain

    result = sdtrain("estimate", write_recipe({"parallel": {"pipeline": {"stages": 2}}}), "--gpus", 3)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "parallel.pipeline.stages 2 does not divide the world size 3" in " ".join(result.stderr.split())


def test_placement_gives_each_rank_its_tensor_parallel_coordinate():
    from sdtrain.launch.plan import LaunchPlan, Node

    plan = LaunchPlan([Node("a", (0, 1, 2, 3), 0), Node("b", (0, 1, 2, 3), 1)], "a", 29500, "gloo", "run")
    rows = plan.placement(Layout(8, pp=2, tp=2))
    assert [(r["host"], r["pipeline_stage"], r["dp_rank"], r["tp_rank"]) for r in rows] == [
        ("a", 0, 0, 0), ("a", 0, 0, 1), ("a", 0, 1, 0), ("a", 0, 1, 1),
        ("b", 1, 0, 0), ("b", 1, 0, 1), ("b", 1, 1, 0), ("b", 1, 1, 1)]  # tp inside a node, pp across
    assert plan.placement() == LaunchPlan(plan.nodes, "a", 29500, "gloo", "run").placement(Layout(8))
