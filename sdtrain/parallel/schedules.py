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
    kind: str  # "F" or "B"
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
    raise ValueError(f"unknown pipeline schedule {name!r}")


def bubble_formula(name: str, stages: int, virtual_stages: int, micro_batches: int) -> float:
    """The idle share of a step the schedule is expected to have (equal F and B per chunk...
    in proportion: the textbook figure)."""
    P, M = stages, micro_batches
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


def simulate(schedule: list[list[Action]], stages: int, chunks: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0) -> dict:
    """Run the schedule on ideal ranks (fixed costs, free communication): each rank's busy
    time, the step's length, and whether it finishes (a deadlocked schedule never does).
    An action waits for its input: F(c, m) for F(c-1, m); B(c, m) for B(c+1, m) and F(c, m)."""
    done: dict[Action, float] = {}
    clocks = [0.0] * stages
    positions = [0] * stages
    busy = [0.0] * stages
    progressed = True
    while progressed:
        progressed = False
        for rank in range(stages):
            while positions[rank] < len(schedule[rank]):
                action = schedule[rank][positions[rank]]
                needs = []
                if action.kind == "F" and action.chunk > 0:
                    needs.append(Action("F", action.chunk - 1, action.micro_batch))
                if action.kind == "B":
                    needs.append(Action("F", action.chunk, action.micro_batch))
                    if action.chunk < chunks - 1:
                        needs.append(Action("B", action.chunk + 1, action.micro_batch))
                if any(n not in done for n in needs):
                    break
                cost = forward_cost if action.kind == "F" else backward_cost
                start = max([clocks[rank], *(done[n] for n in needs)])
                clocks[rank] = done[action] = start + cost
                busy[rank] += cost
                positions[rank] += 1
                progressed = True
    finished = all(positions[r] == len(schedule[r]) for r in range(stages))
    length = max(clocks)
    return {"finished": finished, "step": length, "busy": busy,
            "bubble": [1 - b / length for b in busy] if finished else None}
