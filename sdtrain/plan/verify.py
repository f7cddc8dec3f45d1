"""Predicted beside measured: launch a few layouts through the normal launcher for a few steps
and hold their predicted step time and memory against the run's own numbers.

Which: the top K, and two from the middle and two from the bottom of the ranking, so the rank
correlation spans the range rather than the top's near-ties. Measured step time: the median of
metrics.jsonl's step_s past the first WARMUP_STEPS (allocator growth, first-call overheads);
measured memory: the largest rank's peak in summary.json. Each run is a plain `sdtrain launch`
of the recipe `--write` would write, in its own folder under the verify directory.

With several rounds every pick is launched once per round, round after round (as `sdtrain
bench` alternates its entries), and keeps its fastest step time, since a shared machine's
noise only ever slows a run down, and its largest peak, since memory must fit every time.
On the 2-core VM one layout measured 0.49-0.58 s from launch to launch: more than the gaps
between the top layouts the ranking has to order.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.plan.cluster import Cluster
from sdtrain.plan.rank import Planned
from sdtrain.plan.write import layout_recipe_text

WARMUP_STEPS = 2
EXTRA_PICKS = 2  # from the middle, and from the bottom


@dataclass
class Verified:
    row: Planned
    measured_step_s: float | None
    measured_mem_gib: float | None
    problem: str = ""

    @property
    def predicted_mem_gib(self) -> float:
        return self.row.memory.device_bytes / 2**30

    @property
    def mem_error(self) -> float | None:
        if not self.measured_mem_gib:
            return None
        return self.predicted_mem_gib / self.measured_mem_gib - 1


def picks(fitting: list[Planned], k: int) -> list[Planned]:
    chosen = list(fitting[:k])
    n = len(fitting)
    middle = [fitting[i] for i in range(n // 2, min(n, n // 2 + EXTRA_PICKS))]
    bottom = fitting[max(0, n - EXTRA_PICKS):]
    for row in middle + bottom:
        if row not in chosen:
            chosen.append(row)
    return chosen


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank)."""
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    norm = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / norm if norm else None


def measured(run_dir: Path) -> tuple[float | None, float | None]:
    steps, peak = [], None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("step", 0) > WARMUP_STEPS and record.get("step_s"):
                steps.append(record["step_s"])
    summary = run_dir / "summary.json"
    if summary.is_file():
        peak = max(json.loads(summary.read_text()).get("peak_mem_gib") or [0]) or None
    return (statistics.median(steps) if steps else None), peak


def launch_argv(recipe_file: Path, run_dir: Path, nproc: int, steps: int) -> list[str]:
    """The plain launch of a written recipe (the user's --set overrides are in it already), with
    only what a few timed steps change: no checkpoint, no evaluation, a log line every step."""
    sets = [f"train.steps={steps}", "train.warmup_steps=0", "log.every=1", "checkpoint.at_end=false",
            "checkpoint.every=0", "train.eval_every=0", "train.eval_batches=1"]
    argv = [sys.executable, "-m", "sdtrain", "launch", str(recipe_file), "--nproc-per-node", str(nproc),
            "--run-dir", str(run_dir)]
    for item in sets:
        argv += ["--set", item]
    return argv


def verify(rows: list[Planned], cluster: Cluster, k: int, recipe_path: str, verify_dir: str, steps: int,
           rounds: int = 2) -> list[Verified]:
    if not cluster.source.startswith("measured here"):
        raise UserInputError("--verify launches the layouts on this machine: plan for it (--nproc-per-node N, or "
                             "nothing), not for a cluster given by flags or --cluster")
    fitting = [r for r in rows if r.fits]
    if not fitting:
        raise UserInputError("no layout fits: nothing to verify")
    chosen, root = picks(fitting, k), Path(verify_dir)
    recipes = {}  # each pick's recipe, written once for all its rounds
    for row in chosen:
        (root / row.name).mkdir(parents=True, exist_ok=True)
        recipes[row.name] = root / row.name / "recipe.yaml"
        recipes[row.name].write_text(layout_recipe_text(row, cluster, recipe_path))
    runs: dict[str, list[Verified]] = {row.name: [] for row in chosen}
    for round_index in range(rounds):
        for row in chosen:
            runs[row.name].append(launch_one(row, recipes[row.name], cluster.per_node, steps,
                                             "run" if round_index == 0 else f"run-{round_index + 1}"))
    return [best_of(runs[row.name]) for row in chosen]


def launch_one(row: Planned, recipe_file: Path, nproc: int, steps: int, run_name: str) -> Verified:
    """One round of one pick: its launch, into run_name beside its recipe, with the log."""
    folder = recipe_file.parent
    run_dir = folder / run_name
    argv = launch_argv(recipe_file, run_dir, nproc, steps)
    print(f"verify {row.name}: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    log = folder / f"{run_name}.log"
    log.write_text(done.stdout + done.stderr)
    step_s, mem = measured(run_dir)
    return Verified(row, step_s, mem, "" if done.returncode == 0 else f"exit {done.returncode} (see {log})")


def best_of(runs: list[Verified]) -> Verified:
    """One layout's rounds as one: the fastest step time, the largest peak, the first problem."""
    steps = [v.measured_step_s for v in runs if v.measured_step_s]
    peaks = [v.measured_mem_gib for v in runs if v.measured_mem_gib]
    problem = next((v.problem for v in runs if v.problem), "")
    return Verified(runs[0].row, min(steps) if steps else None, max(peaks) if peaks else None, problem)


def report(results: list[Verified]) -> str:
    width = max([len("layout"), *(len(v.row.name) for v in results)])
    lines = [f"{'layout':<{width}} {'pred s':>9} {'meas s':>9} {'pred GiB':>9} {'meas GiB':>9} {'mem err':>8}"]
    for v in results:
        meas = f"{v.measured_step_s:.4f}" if v.measured_step_s else "-"
        mem = f"{v.measured_mem_gib:.3f}" if v.measured_mem_gib else "-"
        err = f"{v.mem_error:+.1%}" if v.mem_error is not None else "-"
        lines.append(f"{v.row.name:<{width}} {v.row.time.seconds:>9.4f} {meas:>9} {v.predicted_mem_gib:>9.3f} {mem:>9} "
                     f"{err:>8} {v.problem}")
    done = [v for v in results if v.measured_step_s]
    rho = spearman([v.row.time.seconds for v in done], [v.measured_step_s for v in done])
    lines.append(f"Spearman rank correlation, predicted vs measured step time over {len(done)} layouts: "
                 + (f"{rho:.2f}" if rho is not None else "- (needs 3 or more measured)"))
    if done:
        fastest = min(v.measured_step_s for v in done)
        first = results[0]
        if first.measured_step_s:
            lines.append(f"the planner's first choice {first.row.name}: {first.measured_step_s / fastest - 1:+.1%} "
                         "against the fastest measured")
        errors = [abs(v.mem_error) for v in done if v.mem_error is not None]
        if errors:
            lines.append(f"memory: predicted within {max(errors):.1%} of measured peak for every layout run")
    return "\n".join(lines)
