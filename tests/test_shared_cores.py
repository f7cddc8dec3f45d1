"""A pipeline's schedule run with processor sharing (plan/shared_cores.py): as the ideal-rank
simulation where every rank has a core, every core busy where a stage fills them, and above
both easy bounds where the pipeline fills and drains on fewer cores than ranks."""

import pytest

from sdtrain.parallel.schedules import build_schedule, simulate
from sdtrain.plan.shared_cores import shared_pipeline_span

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zero_bubble", 1), ("interleaved", 2)]


@pytest.mark.parametrize("schedule,V", SCHEDULES)
@pytest.mark.parametrize("P,M", [(2, 2), (2, 4), (4, 4), (4, 8)])
def test_a_core_for_every_rank_is_the_ideal_ranks_schedule(schedule, V, P, M):
    ideal = simulate(build_schedule(schedule, P, V, M), P, P * V, forward_cost=1 / 3 / V, backward_cost=2 / 3 / V)
    assert shared_pipeline_span(schedule, P, V, M, (1.0,) * P, 1, P) == pytest.approx(ideal["step"])
    assert shared_pipeline_span(schedule, P, V, M, (1.0,) * P, 2, 2 * P + 1) == pytest.approx(ideal["step"])


@pytest.mark.parametrize("schedule,V", SCHEDULES)
def test_a_stage_that_fills_the_cores_leaves_none_idle(schedule, V):
    """pp 2 x tp 2 on 2 cores: whichever stage has work runs on both, so the step is the work
    of every stage over the cores, the lighter stage's counted as light as it is."""
    weights = (1.0, 0.75)
    span = shared_pipeline_span(schedule, 2, V, 4, weights, 2, 2.0)
    assert span == pytest.approx(4 * sum(weights) * 2 / 2)


@pytest.mark.parametrize("schedule,V", SCHEDULES)
def test_fewer_cores_than_ranks_costs_more_than_either_bound(schedule, V):
    """pp 4 on 2 cores: the fill and drain leave a core idle (above busy / share) while the
    steady part slows every rank (above the ideal ranks' step); never past their sum's worst."""
    P, M = 4, 8
    ideal = shared_pipeline_span(schedule, P, V, M, (1.0,) * P, 1, P)
    shared = shared_pipeline_span(schedule, P, V, M, (1.0,) * P, 1, 2)
    busy_over_share = P * M / 2
    assert shared > max(busy_over_share, ideal)
    assert shared <= busy_over_share + (ideal - M)
    # lighter stages shorten it (their work, not the slowest stage's, is what shares the cores)
    assert shared_pipeline_span(schedule, P, V, M, (1.0, 0.5, 0.5, 0.5), 1, 2) < shared
