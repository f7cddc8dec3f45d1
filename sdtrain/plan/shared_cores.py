"""A pipeline's step where its CPU ranks share cores: the schedule run with processor sharing.

With more ranks than cores there are two easy lower bounds on a pipeline's step: every core
busy all the time (the ranks' busy time / rank_share), and no rank ever slowed (busy time
plus the bubble). The truth lies above both where both bind: while the pipeline fills and
drains fewer ranks have work than there are cores, and a core idles; in the steady part
more ranks have work than cores, and each is slowed. bench-20m at 4x its width, pp 4 at
four micro-batches on 4 ranks and 2 cores, was predicted 1.36 s by the larger bound and
measured 1.43-1.59 s in single launches.

So the schedule (parallel/schedules.py) runs here action by action, each stage's current
action at rate min(1, cores / ranks with work): a stage of tp x dp ranks counts as that
many. Pure arithmetic on the schedule, cached by its shape: no torch, no clock.
"""

from __future__ import annotations

from functools import lru_cache

from sdtrain.parallel.schedules import Action, action_cost, build_schedule, inputs, splits_backward

FORWARD_SHARE = 1 / 3  # of a micro-batch's forward + backward; the rest is backward (split B/W under zero bubble)


@lru_cache(maxsize=4096)
def shared_pipeline_span(schedule: str, P: int, V: int, M: int, stage_weights: tuple[float, ...],
                         width: int, cores: float) -> float:
    """The step's pipeline part, in units of the slowest stage's micro-batch (forward and
    backward) on a core of its own: stage_weights[p] is stage p's micro-batch in those units,
    width its ranks, cores what they all share."""
    actions = build_schedule(schedule, P, V, M)
    split = splits_backward(actions)
    chunks = P * V
    done: set[Action] = set()

    def cost(action: Action, p: int) -> float:  # stage p's share of a micro-batch, over its V chunks
        micro = stage_weights[p] / V
        return action_cost(action, split, FORWARD_SHARE * micro, (1 - FORWARD_SHARE) * micro)

    position, left = [0] * P, [cost(actions[p][0], p) for p in range(P)]
    now = 0.0
    while any(position[p] < len(actions[p]) for p in range(P)):
        ready = [p for p in range(P) if position[p] < len(actions[p])
                 and all(n in done for n in inputs(actions[p][position[p]], chunks))]
        if not ready:
            raise RuntimeError(f"{schedule} schedule for P={P}, M={M} deadlocks")
        rate = min(1.0, cores / (width * len(ready)))
        step = min(left[p] for p in ready) / rate
        now += step
        finished = [p for p in ready if left[p] <= step * rate * (1 + 1e-12)]
        for p in ready:
            left[p] -= step * rate
        for p in finished:  # completions land together, after every rate of this interval was used
            done.add(actions[p][position[p]])
            position[p] += 1
            if position[p] < len(actions[p]):
                left[p] = cost(actions[p][position[p]], p)
    return now
