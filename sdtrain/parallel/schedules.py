"""Pipeline schedules: the order in which each rank runs forward and backward passes of its
chunks over a step's micro-batches. Pure data, no torch: the executor (pipeline.py) runs the
actions, and tests can simulate them.

An action is (kind, chunk, micro-batch): "F" runs a chunk's forward on a micro-batch, "B"
its backward. Chunk c (of P x V) lives on rank c mod P; data flows chunk c -> c + 1.

- GPipe: every forward, then every backward. M micro-batches' activations live at once.
- 1F1B: P - 1 - p warm-up forwards, then one forward and one backward in turn, then the
  remaining backwards: at most P micro-batches in flight on any rank, same bubble as GPipe.
- Interleaved 1F1B (Narayanan et al. 2021): each rank holds V chunks spread over the depth
  and runs micro-batches in groups of P through them: the bubble shrinks V times.

Bubble fraction for P stages and M micro-batches: (P - 1) / (M + P - 1); interleaved:
(P - 1) / (V·M + P - 1).
"""

from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    kind: str  # "F", "B", or (zero bubble) "W": B makes only the input's gradient, W the weights'
    chunk: int  # global chunk index, 0..P*V-1
    micro_batch: int


def build_schedule(name: str, stages: int, virtual_stages: int, micro_batches: int) -> list[list[Action]]:
    """Each rank's actions for one step, in order."""
    P, V, M = stages, virtual_stages, micro_batches
    if name == "gpipe":
        return [_gpipe(p, P, M) for p in range(P)]
    if name == "1f1b":
        return [_one_f_one_b(p, P, M) for p in range(P)]
    if name == "interleaved":
        return [_interleaved(p, P, V, M) for p in range(P)]
    if name == "zero_bubble":
        return _zero_bubble(P, M)
    raise ValueError(f"unknown pipeline schedule {name!r}")


def bubble_formula(name: str, stages: int, virtual_stages: int, micro_batches: int) -> float:
    """The idle share of a step the schedule is expected to have, with a backward twice as
    long as a forward (the textbook figures; zero bubble: its own schedule on ideal ranks)."""
    P, M = stages, micro_batches
    if name == "zero_bubble":
        return simulate(_zero_bubble(P, M), P, P)["bubble_mean"]
    V = virtual_stages if name == "interleaved" else 1
    return (P - 1) / (V * M + P - 1)


def _gpipe(p: int, P: int, M: int) -> list[Action]:
    return [Action("F", p, m) for m in range(M)] + [Action("B", p, m) for m in range(M)]


def _one_f_one_b(p: int, P: int, M: int) -> list[Action]:
    warmup = min(P - 1 - p, M)
    actions = [Action("F", p, m) for m in range(warmup)]
    forward, backward = warmup, 0
    while forward < M:
        actions += [Action("F", p, forward), Action("B", p, backward)]
        forward, backward = forward + 1, backward + 1
    actions += [Action("B", p, m) for m in range(backward, M)]
    return actions


def _interleaved(p: int, P: int, V: int, M: int) -> list[Action]:
    """Megatron-LM's interleaved schedule: forward unit k of this rank runs virtual chunk
    (k // P) mod V on micro-batch (k // (P V)) P + k mod P; backward units go through the
    chunks in reverse. Needs M to be a multiple of P."""
    total = V * M

    def unit(k: int, backward: bool) -> tuple[int, int]:
        v = (k // P) % V
        if backward:
            v = V - 1 - v
        return v * P + p, (k // (P * V)) * P + k % P

    warmup = min((P - p - 1) * 2 + (V - 1) * P, total)
    actions = [Action("F", *unit(k, False)) for k in range(warmup)]
    forward, backward = warmup, 0
    while forward < total:
        actions += [Action("F", *unit(forward, False)), Action("B", *unit(backward, True))]
        forward, backward = forward + 1, backward + 1
    actions += [Action("B", *unit(k, True)) for k in range(backward, total)]
    return actions


def _zero_bubble(P: int, M: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al. 2023), found greedily on ideal ranks: whenever a rank is free it runs
    a ready B (the critical path), else the next F while no more than 1F1B's P - p
    micro-batches are in flight (so activation memory stays 1F1B's), else a deferred W, which
    fills what would be a bubble. The first chunk has no input gradient to send: its B is the
    whole backward and its W is empty. Ranks run in the order found here, which already
    satisfied every dependency, so the real run cannot deadlock."""
    done: dict[Action, float] = {}
    clocks, plans = [0.0] * P, [[] for _ in range(P)]
    next_forward, in_flight = [0] * P, [0] * P
    while any(len(plan) < 3 * M for plan in plans):
        busy = [r for r in range(P) if len(plans[r]) < 3 * M]
        now = min(clocks[r] for r in busy)
        choices = [(r, _next_zero_bubble_action(r, P, M, now, done, next_forward[r], in_flight[r]))
                   for r in busy if clocks[r] == now]
        choices = [(r, a) for r, a in choices if a is not None]
        if not choices:  # nothing ready anywhere yet: move the idle ranks to the next event
            later = [t for t in [*done.values(), *clocks] if t > now]
            if not later:
                raise RuntimeError(f"zero-bubble schedule for P={P}, M={M} deadlocks")
            for r in busy:
                clocks[r] = max(clocks[r], min(later))
            continue
        p, action = choices[0]
        clocks[p] = done[action] = clocks[p] + action_cost(action, True, 1.0, 2.0)
        plans[p].append(action)
        if action.kind == "F":
            next_forward[p] += 1
            in_flight[p] += 1
        elif action.kind == "W":
            in_flight[p] -= 1
    return plans


def _next_zero_bubble_action(p, P, M, now, done, forward, in_flight) -> Action | None:
    def ready(action: Action) -> bool:
        return action in done and done[action] <= now

    for m in range(M):
        b = Action("B", p, m)
        if b not in done and ready(Action("F", p, m)) and (p == P - 1 or ready(Action("B", p + 1, m))):
            return b
    if forward < M and in_flight < P - p and (p == 0 or ready(Action("F", p - 1, forward))):
        return Action("F", p, forward)
    for m in range(M):
        w = Action("W", p, m)
        if w not in done and ready(Action("B", p, m)):
            return w
    return None


def simulate(schedule: list[list[Action]], stages: int, chunks: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0, costs: list[list[float]] | None = None) -> dict:
    """Run the schedule on ideal ranks (free communication): each rank's busy time, the
    step's length, and whether it finishes (a deadlocked schedule never does). An action
    waits for its input: F(c, m) for F(c-1, m); B(c, m) for B(c+1, m) and F(c, m); W(c, m)
    for B(c, m). Each action costs costs[rank][i] where given (a real step's compute times:
    the replay), else the fixed costs: split backwards (B and W) half a backward each, the
    first chunk's B the whole of it."""
    done: dict[Action, float] = {}
    clocks = [0.0] * stages
    positions = [0] * stages
    split = splits_backward(schedule)
    busy = [0.0] * stages
    progressed = True
    while progressed:
        progressed = False
        for rank in range(stages):
            while positions[rank] < len(schedule[rank]):
                action = schedule[rank][positions[rank]]
                needs = inputs(action, chunks)
                if any(n not in done for n in needs):
                    break
                cost = costs[rank][positions[rank]] if costs else action_cost(action, split, forward_cost, backward_cost)
                start = max([clocks[rank], *(done[n] for n in needs)])
                clocks[rank] = done[action] = start + cost
                busy[rank] += cost
                positions[rank] += 1
                progressed = True
    finished = all(positions[r] == len(schedule[r]) for r in range(stages))
    length = max(clocks)
    bubble = [1 - b / length for b in busy] if finished else None
    return {"finished": finished, "step": length, "busy": busy, "bubble": bubble,
            "bubble_mean": sum(bubble) / stages if finished else None}


def replay(schedule: list[list[Action]], chunks: int, costs: list[list[list[float]]]) -> float | None:
    """The bubble of a run's steps replayed with free communication: costs[rank][step][i] is
    what action i of rank's schedule computed for in that step. Each step runs on its own
    costs, so a pass that ran long in one step delays its neighbours there, as it did in the
    run (a replay on costs summed over steps would smooth that jitter away); idle and wall
    time are summed over the steps, as the run's own bubble is. None: a step that cannot
    finish, or no steps."""
    stages = len(schedule)
    busy, length = [0.0] * stages, 0.0
    for step in zip(*costs):
        result = simulate(schedule, stages, chunks, costs=list(step))
        if not result["finished"]:
            return None
        busy = [b + r for b, r in zip(busy, result["busy"])]
        length += result["step"]
    return sum(1 - b / length for b in busy) / stages if length else None


def inputs(action: Action, chunks: int) -> list[Action]:
    """What an action waits for: F(c, m) for F(c-1, m); B(c, m) for F(c, m) and B(c+1, m);
    W(c, m) for B(c, m)."""
    c, m = action.chunk, action.micro_batch
    if action.kind == "F":
        return [Action("F", c - 1, m)] if c > 0 else []
    if action.kind == "B":
        return [Action("F", c, m)] + ([Action("B", c + 1, m)] if c < chunks - 1 else [])
    return [Action("B", c, m)]


def splits_backward(schedule: list[list[Action]]) -> bool:
    """Whether the schedule runs backward as B and W (zero bubble)."""
    return any(a.kind == "W" for actions in schedule for a in actions)


def action_cost(action: Action, split: bool, forward_cost: float, backward_cost: float) -> float:
    """An action's time on a rank of its own: split backwards (B and W) half a backward each,
    the first chunk's B the whole of it (it has no input gradient to send) and its W nothing."""
    if action.kind == "F":
        return forward_cost
    if not split:
        return backward_cost
    if action.chunk == 0:
        return backward_cost if action.kind == "B" else 0.0
    return backward_cost / 2
